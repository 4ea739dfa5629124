"""Text-to-image on captioned shapes: a UNet with cross-attention and an MM-DiT, prompt adherence measured exactly.

Each model trains on 50 000 captioned-shapes images of the ``train`` split (32 px; the held-out (colour, shape)
pairs never shown) with the frozen all-MiniLM-L6-v2 text encoder and 10 % caption dropout, then samples one image
per prompt (DPM-Solver++(2M), EMA weights, bf16) for two prompt sets of 600 dataset captions each (200 single
objects, 200 two-object relations, 100 counts, 100 lists), drawn from the ``train`` distribution and from the
``heldout`` split (every prompt names a pair never seen in training), at guidance weights ``--cfg`` and
NFE ``--nfe``. :func:`sdeflow.evaluation.adherence.adherence` scores each attribute the caption states; FID
compares ``--fid-n`` samples of training-distribution captions (NFE 20) with as many real images of other seeds.

    python benchmarks/text_to_image.py [--models unet,mmdit] [--phase all|train|eval] [--text-encoder minilm]
        [--inception-weights .carry/fid_inception_fp16.safetensors] [--append]
    python benchmarks/text_to_image.py --report-only

Writes ``text_to_image.{json,md}`` and grids ``t2i_<model>_<split>.png`` (one row per prompt) under ``--out``.
``--smoke`` checks the script on the CPU with a few steps and prompts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from timing import results_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"unet": "shapes_unet_text.yaml", "mmdit": "shapes_mmdit.yaml"}
QUOTAS = {"single": 200, "relation": 200, "count": 100, "list": 100}
GRID_PROMPTS = 8


def eval_prompts(split: str, quotas: dict[str, int], seed: int = 12_345) -> list[str]:
    """Dataset captions of ``split``, the first ones of each kind up to its quota (a fixed, reproducible set)."""
    from sdeflow.data.shapes import make_scene

    left, out, i = dict(quotas), [], 0
    while any(left.values()):
        scene = make_scene(seed, i, split)
        if left.get(scene.spec.kind, 0) > 0:
            left[scene.spec.kind] -= 1
            out.append(scene.caption)
        i += 1
    return out


def train(name: str, a: argparse.Namespace) -> dict[str, Any]:
    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    steps = [f"train.steps={a.steps}"] if a.steps else []
    over = [f"out_dir={Path(a.runs) / name}", *steps, f"train.batch_size={a.batch}",
            f"text.encoder={a.text_encoder}", "train.ckpt_every=500", "train.sample_every=0", "train.tensorboard=false",
            "train.log_every=500", *a.set]  # fmt: skip
    if a.smoke:
        over += ["data.num_samples=256", "train.precision=fp32", "train.channels_last=false"]
        over += ["model.kwargs.model_channels=16"] if name == "unet" else ["model.kwargs.hidden_size=48",
                                                                            "model.kwargs.depth=2"]  # fmt: skip
    tr = Trainer(load_config(ROOT / "configs" / CONFIGS[name], over), progress=False, overwrite=True)
    s = tr.fit()
    s["images_per_s"] = round(s["steps"] * a.batch / s["seconds"], 1)
    s["params_M"] = round(sum(p.numel() for p in tr.objective.net.parameters()) / 1e6, 2)
    s["command"] = f"sdeflow train configs/{CONFIGS[name]} " + " ".join(f"--set {o}" for o in over[1:])
    (Path(a.runs) / name / "bench_train.json").write_text(json.dumps(s, indent=1))
    return s


def trained(run: Path) -> dict[str, Any]:
    """The training summary of a run kept by ``--phase train``; a run stopped by a time limit is taken at its
    last checkpoint, and said so."""
    from sdeflow.checkpoint import find_latest

    if (run / "bench_train.json").is_file():
        return json.loads((run / "bench_train.json").read_text())
    ck = find_latest(run / "checkpoints")
    if ck is None:
        raise SystemExit(f"no finished or checkpointed run under {run}")
    step = int(json.loads((ck / "meta.json").read_text())["step"])
    return {"steps": step, "checkpoint": str(ck), "stopped_early": True, "images_per_s": None, "params_M": None,
            "command": "(stopped by the time limit)"}  # fmt: skip


def draw(m: Any, prompts: list[str], w: float, nfe: int, dev: str, seed: int, batch: int = 600) -> torch.Tensor:
    from sdeflow.sampling import accelerate_denoiser, steps_for_nfe
    from sdeflow.sampling.prompts import sample_prompts

    den = accelerate_denoiser(m.denoiser, "bf16" if dev == "cuda" else "fp32")
    out = []
    for i in range(0, len(prompts), batch):
        steps = steps_for_nfe("dpmpp_2m", nfe)
        r = sample_prompts(den, m.text_encoder, prompts[i : i + batch], m.data_shape, m.process, guidance=w,
                           sampler="dpmpp_2m", steps=steps, seed=seed + i, device=dev)  # fmt: skip
        out.append(r.samples.float().cpu().clamp(-1, 1))
    return torch.cat(out)


def evaluate(name: str, ckpt: str, a: argparse.Namespace, fid: Any, dev: str) -> dict[str, Any]:
    from sdeflow.builders import load
    from sdeflow.data import ShapesDataset, save_prompt_grid
    from sdeflow.evaluation.adherence import adherence

    m = load(ckpt, device=dev, text_encoder=a.text_encoder)
    quotas = {k: max(2, v // (50 if a.smoke else 1)) for k, v in QUOTAS.items()}
    prompts = {split: eval_prompts(split, quotas) for split in ("train", "heldout")}
    rows = []
    for w in a.cfg:
        for nfe in a.nfe:
            for split, ps in prompts.items():
                dev_sync(dev)
                t0 = time.perf_counter()
                x = draw(m, ps, w, nfe, dev, seed=1000)
                seconds = time.perf_counter() - t0
                row = {"cfg": w, "nfe": nfe, "split": split, "images_per_s": round(len(ps) / seconds, 1)}
                row.update({k: round(v, 4) for k, v in adherence(x, ps).items()})
                rows.append(row)
                print(name, row, flush=True)
    out: dict[str, Any] = {"adherence": rows, "fid": {}}
    fid_prompts = [s.caption for s in ShapesDataset(a.fid_n, 32, "train", seed=777).scenes]
    for w in a.cfg:
        out["fid"][str(w)] = fid(draw(m, fid_prompts, w, 20, dev, seed=50_000))
        print(name, "fid", w, out["fid"][str(w)], flush=True)
    best = max(a.cfg, key=lambda w: sum(r["all_correct"] for r in rows if r["cfg"] == w and r["nfe"] == 20) or 0)
    out["best_cfg"] = best
    for split, ps in prompts.items():  # the first prompts of each kind, 8 samples each
        pick = [p for k in QUOTAS for p in ps if _kind(p) == k][:: max(1, len(ps) // GRID_PROMPTS)][:GRID_PROMPTS]
        x = draw(m, [p for p in pick for _ in range(8)], best, 20, dev, seed=7)
        save_prompt_grid(x, pick, Path(a.out) / f"t2i_{name}_{split}.png")
    return out


def _kind(prompt: str) -> str:
    from sdeflow.data.captions import parse_caption

    return parse_caption(prompt).kind


def dev_sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


class FID:
    def __init__(self, weights: str | None, n: int, dev: str):
        from sdeflow.data import ShapesDataset
        from sdeflow.evaluation import FeatureStats, inception_features

        self.features = inception_features(weights, dev, batch=250)
        self.ref = FeatureStats.of(self.features(ShapesDataset(n, 32, "train", seed=778).x))

    def __call__(self, x: torch.Tensor) -> float:
        from sdeflow.evaluation import FeatureStats, frechet_distance

        return round(float(frechet_distance(FeatureStats.of(self.features(x)), self.ref)), 2)


def write_report(out: Path, data: dict) -> None:
    L = ["# Text-to-image on captioned shapes", "", f"{data['device']} · torch {data['torch']} · {data['date']}",
         "", f"`{data['command']}`", "", "Adherence: share of prompts whose stated attribute the image satisfies "
         "(exact: segmentation of the flat colours + a shape classifier trained on the dataset's masks); "
         "`all` = every stated attribute right; per kind: single object, two-object relation, count, list. "
         "`train` prompts come from the training distribution, `heldout` prompts each name a (colour, shape) pair "
         "never shown in training.", ""]  # fmt: skip
    for name, r in data["models"].items():
        t = r["train"]
        L += [f"## {name}: {t['params_M']} M parameters, {t['steps']} steps × {data['batch']} "
              f"({t['images_per_s']} img/s training), best guidance w = {r['best_cfg']}", "",
              "| w | NFE | split | count | color | shape | size | position | relation | all | single | relation "
              "(all) | count (all) | list (all) | img/s |", "|" + "---|" * 15]  # fmt: skip
        for row in r["adherence"]:
            cells = [row.get(k) for k in ("count", "color", "shape", "size", "position", "relation", "all_correct",
                                          "all_correct_single", "all_correct_relation", "all_correct_count",
                                          "all_correct_list")]  # fmt: skip
            pct = ["" if c is None else f"{100 * c:.1f}" for c in cells]
            L.append(
                f"| {row['cfg']} | {row['nfe']} | {row['split']} | " + " | ".join(pct) + f" | {row['images_per_s']} |"
            )
        L += ["", "FID (NFE 20, training-distribution prompts, vs real images): "
              + ", ".join(f"w = {w}: {v}" for w, v in r["fid"].items()), "",
              f"![{name} samples, train prompts](t2i_{name}_train.png)",
              f"![{name} samples, held-out prompts](t2i_{name}_heldout.png)", "",
              f"Training command: `{t['command']}`", ""]  # fmt: skip
    out.joinpath("text_to_image.md").write_text("\n".join(L) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="unet,mmdit")
    p.add_argument("--steps", type=int, help="default: the config's train.steps")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--cfg", default="1,2,4,7")
    p.add_argument("--nfe", default="10,20,50")
    p.add_argument("--fid-n", type=int, default=5000)
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--inception-weights")
    p.add_argument("--runs", default="runs/bench_t2i")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--append", action="store_true", help="keep the other models' rows of an earlier run")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--set", action="append", default=[], help="a config override for both models' training")
    p.add_argument("--phase", choices=["all", "train", "eval"], default="all",
                   help="train: train and keep the run under --runs; eval: evaluate the run kept there")  # fmt: skip
    a = p.parse_args()
    a.cfg = [float(v) for v in a.cfg.split(",")]
    a.nfe = [int(v) for v in a.nfe.split(",")]
    jfile = results_json(a.out, "text_to_image", a.report_only, write_report)
    if jfile is None:
        return
    out = jfile.parent
    if a.smoke:
        a.steps, a.batch, a.fid_n, a.cfg, a.nfe = 2, 8, 16, [1.0, 4.0], [10]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    data = json.loads(jfile.read_text()) if a.append and jfile.is_file() else {"models": {}}
    data.update(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                date=datetime.date.today().isoformat(), commit=git.strip(), batch=a.batch,
                command="python benchmarks/text_to_image.py " + " ".join(sys.argv[1:]))  # fmt: skip
    fid = None if a.phase == "train" else FID(a.inception_weights, a.fid_n, dev)
    for name in a.models.split(","):
        if a.phase == "eval":
            t = trained(Path(a.runs) / name)
        else:
            t = train(name, a)
        print(name, {k: v for k, v in t.items() if k != "command"}, flush=True)
        if a.phase == "train":
            continue
        data["models"][name] = {"train": t, **evaluate(name, t["checkpoint"], a, fid, dev)}
        jfile.write_text(json.dumps(data, indent=1, default=str))
        write_report(out, data)


if __name__ == "__main__":
    main()
