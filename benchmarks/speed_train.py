"""Training-loop speed side by side with diffusers, in one run: images/s, MFU, peak memory, kernel profile.

Parts (``--parts``, default both):

- ``train_unet``: whole training steps (data, noise, forward, loss, backward, clipping, optimizer, EMA) with the
  CIFAR-size UNet on 32×32×3 batches of the real MNIST digits (padded, three channels), batch 128, bf16.
  sdeflow's ``Trainer`` (DDPM++ 55.7 M, the DDPM ε-recipe) eager, compiled, and compiled with the fast paths
  (channels-last, fused AdamW) against diffusers' ``UNet2DModel`` of the same structure (59.0 M) in (a) the loop of
  diffusers' ``train_unconditional.py`` example (accelerate bf16, ``DDPMScheduler.add_noise``, ``EMAModel``, a
  DataLoader, clipping, the per-step ``loss.item()`` of its progress bar) and (b) a plain loop tuned as far as it
  goes (data on the GPU, no per-step sync, fused AdamW, foreach EMA, cuDNN autotuning), eager and compiled.
- ``train_dit``: the same for DiT-B/2 on 32×32×4 inputs (the latent shape of 256-px images), 1000 classes, batch
  256, against diffusers' ``DiTTransformer2DModel`` of the same width, depth, heads and patch.

MFU = model FLOPs of one forward+backward × steps/s over the bf16 peak measured at the start of the run.

    python benchmarks/speed_train.py [--parts train_unet,train_dit] [--rows unet:sdeflow:fast,...] [--append]

Writes ``speed_train.{json,md}`` and ``speed_train_profile.md`` under ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from speed_models import diffusers_dit, diffusers_unet, mnist_npz, size, use_torch_group_norm
from speed_tables import speed_tables
from timing import Bench, count_flops, load_results, profile, profile_markdown, start, time_steps

VARIANTS = {  # --rows key → variant; the last four compile long and run only when named
    "eager": "eager",
    "compile": "compile",
    "fast": "compile, fast paths",
    "autotune": "compile, fast paths, max-autotune",
    "coord": "compile, fast paths, coordinate-descent tuning",
    "torchgn": "compile, fast paths, PyTorch GroupNorm",
    "graphs": "compile, fast paths, CUDA graphs (reduce-overhead)",
    "step": "compile, fast paths, whole step in one CUDA graph",
    "stepinductor": "compile, fast paths, whole step in one CUDA graph, norms by Inductor",
}
ON_REQUEST = ("autotune", "coord", "torchgn", "graphs", "step", "stepinductor")


def sdeflow_trainer(
    kind: str,
    npz: Path,
    out: Path,
    compiled: bool,
    fast: bool,
    bench: Bench,
    mode: str = "default",
    options: str = "{}",
    graph: bool = False,
    norms: str = "auto",
):
    """sdeflow's Trainer on the benchmark model; ``fast``: channels-last, fused AdamW and cuDNN-first attention;
    ``mode`` or ``options`` (Inductor options, YAML) go to torch.compile; ``graph``: the whole step replayed
    from one CUDA graph (``train.cuda_graph``); ``norms``: ``train.norm_backend``."""
    dev = bench.device
    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    s = size(kind, bench.smoke)
    if kind == "unet":
        model = [
            "model.kind=unet",
            "model.preset=ddpmpp_cifar10",
            f"model.kwargs={{dropout: 0.0, model_channels: {s['ch']}, channel_mult: {list(s['mult'])}, "
            f"num_blocks: {s['blocks']}}}",
            "model.num_classes=0",
        ]
    else:
        model = ["model.kind=dit", f"model.preset={s['preset']}", "model.num_classes=1000"]
    cfg = load_config(
        None,
        [
            f"out_dir={out}",
            "data.name=npz",
            f"data.path={npz}",
            *model,
            "diffusion.recipe=ddpm",  # ε-prediction on DDPM's discrete VP chain: the same work as diffusers'
            "train.steps=1000000",
            f"train.batch_size={s['batch']}",
            "train.lr=1e-4",
            "train.grad_clip=1.0",
            "train.ema={kind: fixed, decay: 0.9999}",
            "train.precision=bf16",
            f"train.compile={str(compiled).lower()}",
            f"train.compile_mode={mode}",
            f"train.compile_options={options}",
            f"train.cuda_graph={str(graph).lower()}",
            f"train.norm_backend={norms}",
            f"train.channels_last={str(fast and kind == 'unet').lower()}",
            f"train.fused_optimizer={str(fast).lower()}",
            f"train.attention_backend={'auto' if fast else 'default'}",
            "train.ckpt_every=0",
            "train.tensorboard=false",
            f"train.device={'auto' if dev.type == 'cuda' else 'cpu'}",
        ],
    )
    return Trainer(cfg, progress=False)


def sdeflow_train_row(kind: str, variant: str, npz: Path, tmp: Path, bench: Bench) -> dict:
    compiled, fast = variant != "eager", variant.startswith("compile, fast paths")
    mode = "max-autotune-no-cudagraphs" if "max-autotune" in variant else "default"
    mode = "reduce-overhead" if "reduce-overhead" in variant else mode  # forward and backward replayed from graphs
    # coordinate descent: Inductor times neighbouring block sizes of each Triton kernel (the norms, GELU, ...)
    options = "{coordinate_descent_tuning: true}" if "coordinate-descent" in variant else "{}"
    graph = "one CUDA graph" in variant
    from sdeflow.models.layers import set_norm_backend

    # "norms by Inductor": our PyTorch formulation of the norms compiled by Inductor instead of our Triton operators
    norms = "torch" if "norms by Inductor" in variant else "auto"
    old_norms = set_norm_backend(norms)  # the Trainer sets the same from its config (train.norm_backend)
    try:
        return _sdeflow_train_row(kind, variant, npz, tmp, bench, compiled, fast, mode, options, graph, norms)
    finally:
        set_norm_backend(old_norms)


def _sdeflow_train_row(
    kind: str, variant: str, npz: Path, tmp: Path, bench: Bench, compiled: bool, fast: bool, mode: str, options: str,
    graph: bool, norms: str,
) -> dict:  # fmt: skip
    dev = bench.device
    tr = sdeflow_trainer(kind, npz, tmp / f"{kind}_{variant}", compiled, fast, bench, mode, options, graph, norms)
    net = tr.objective.net
    if "PyTorch GroupNorm" in variant:  # compilation is lazy: the swap is seen by the first step
        use_torch_group_norm(net)
    b = size(kind, bench.smoke)["batch"]
    x = torch.randn(min(b, 8), *tr.data_shape, device=dev)
    t = torch.rand(len(x), device=dev) * 999
    y = torch.randint(0, 1000, (len(x),), device=dev) if kind == "dit" else None
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        flops = count_flops(lambda: net(x, t, y)) * b // len(x)
    net.zero_grad(set_to_none=True)
    graphs = graph or mode == "reduce-overhead"
    m = time_steps(tr.train_step, dev, bench.n(3, 1), bench.n(10, 2), bench.n(3, 1), graphs)
    row = _row(kind, "sdeflow", variant, net, b, m, flops, bench.peak)
    row["attention_backend"] = tr.cfg.train.attention_backend
    kernels = profile(tr.train_step, dev) if compiled and dev.type == "cuda" else None
    return row | ({"profile": kernels} if kernels else {})


def _row(kind: str, lib: str, variant: str, net: torch.nn.Module, batch: int, m: dict, flops: int, peak: float) -> dict:
    return {
        "part": f"train_{kind}",
        "library": lib,
        "variant": variant,
        "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
        "batch": batch,
        "images_per_s": batch / m["sec"],
        "step_ms": m["sec"] * 1e3,
        "spread": m["spread"],
        "peak_mem_GiB": m["mem"],
        "warmup_s": round(m["warmup_s"], 1),
        "flops_per_step": flops,
        "mfu": flops / m["sec"] / peak,
    }


def diffusers_example_unet_row(npz: Path, bench: Bench) -> dict:
    """The loop of diffusers' examples/unconditional_image_generation/train_unconditional.py, bf16."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    dev = bench.device
    torch.backends.cudnn.benchmark = False  # PyTorch's default, which the example keeps
    data = torch.as_tensor(np.load(npz)["x"]).float() / 127.5 - 1

    class Flip(torch.utils.data.Dataset):  # the example's RandomHorizontalFlip (+ ToTensor/Normalize done above)
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict:
            img = data[i]
            return {"input": img.flip(-1) if torch.rand(()) < 0.5 else img}

    b = size("unet", bench.smoke)["batch"]
    accelerator = Accelerator(mixed_precision="bf16", cpu=dev.type == "cpu")
    model = diffusers_unet(bench.smoke)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    loader = torch.utils.data.DataLoader(Flip(), batch_size=b, shuffle=True, num_workers=0, drop_last=True)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=10**6)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    ema.to(accelerator.device)
    batches = iter(())
    logs: dict = {}

    def step() -> None:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        clean = batch["input"].to(torch.bfloat16)
        noise = torch.randn(clean.shape, dtype=torch.bfloat16, device=clean.device)
        timesteps = torch.randint(0, 1000, (clean.shape[0],), device=clean.device).long()
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        with accelerator.accumulate(model):
            pred = model(noisy, timesteps, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            ema.step(model.parameters())
        logs.update(loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])  # the example's progress bar

    x = torch.randn(8, 3, 32, 32, device=dev)
    t = torch.randint(0, 1000, (8,), device=dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        flops = count_flops(lambda: model(x, t).sample) * b // 8
    optimizer.zero_grad()
    m = time_steps(step, dev, bench.n(3, 1), bench.n(10, 2), bench.n(3, 1))
    torch.backends.cudnn.benchmark = True
    return _row("unet", "diffusers", "train_unconditional.py loop (eager)", model, b, m, flops, bench.peak)


def diffusers_tuned_row(kind: str, npz: Path, bench: Bench, compiled: bool) -> dict:
    """A plain diffusers loop with every fast path we know: data on the GPU, no per-step host sync, fused
    AdamW, foreach EMA, cuDNN autotuning, optional torch.compile (PyTorch's default attention order)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from sdeflow.models.layers import set_attention_backend

    dev = bench.device
    set_attention_backend("default")
    torch.backends.cudnn.benchmark = True
    b = size(kind, bench.smoke)["batch"]
    model = (diffusers_unet(bench.smoke) if kind == "unet" else diffusers_dit(bench.smoke)).to(dev).train()
    nhwc = compiled and kind == "unet"  # diffusers' speed recipe: channels-last weights and batches
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if compiled else model
    data = (torch.as_tensor(np.load(npz)["x"]).float() / 127.5 - 1).to(dev)
    labels = torch.as_tensor(np.load(npz)["y"]).to(dev)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    fused = dev.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    ema = EMAModel(model.parameters(), decay=0.9999, foreach=True)
    ema.to(dev)
    gen = torch.Generator(dev).manual_seed(0)

    def call(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, net: torch.nn.Module) -> torch.Tensor:
        if kind == "unet":
            return net(x, t, return_dict=False)[0]
        return net(x, timestep=t, class_labels=y, return_dict=False)[0]

    def step() -> None:
        idx = torch.randint(0, len(data), (b,), device=dev, generator=gen)
        clean, y = data[idx], labels[idx]
        clean = clean.contiguous(memory_format=torch.channels_last) if nhwc else clean
        noise = torch.randn(clean.shape, device=dev, generator=gen)
        noise = noise.contiguous(memory_format=torch.channels_last) if nhwc else noise
        t = torch.randint(0, 1000, (b,), device=dev, generator=gen)
        noisy = scheduler.add_noise(clean, noise, t)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            pred = call(noisy, t, y, fwd)
        F.mse_loss(pred.float(), noise).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    x = torch.randn(8, *data.shape[1:], device=dev)
    t = torch.randint(0, 1000, (8,), device=dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        flops = count_flops(lambda: call(x, t, labels[:8], model)) * b // 8
    optimizer.zero_grad(set_to_none=True)
    m = time_steps(step, dev, bench.n(3, 1), bench.n(10, 2), bench.n(3, 1))
    variant = "plain loop, " + ("compile" if compiled else "eager") + (", channels-last" if nhwc else "")
    variant += " (data on GPU, fused AdamW, foreach EMA)"
    return _row(kind, "diffusers", variant, model, b, m, flops, bench.peak)


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--parts", default="train_unet,train_dit")
    ap.add_argument(
        "--rows",
        help="only these rows, e.g. unet:sdeflow:fast,dit:diffusers:compile (model:library:variant with variant in "
        f"{', '.join(VARIANTS)}, example); default all but {', '.join(ON_REQUEST)}",
    )


def write_report(out: Path) -> None:
    metas, rows = load_results(out, "speed_train")
    (out / "speed_train.md").write_text(speed_tables(metas, rows, "Training speed: sdeflow and diffusers side by side"))
    title = "Kernel profiles: sdeflow's compiled training steps (GPU kernel time)"
    (out / "speed_train_profile.md").write_text(profile_markdown(rows, title))
    print((out / "speed_train.md").read_text())


def main() -> None:
    bench, args = start("speed_train", __doc__, _args)
    if bench is None:
        return write_report(Path(args.out))
    wanted = set(args.rows.split(",")) if args.rows else None
    tmp = Path(tempfile.mkdtemp(prefix="sdeflow_speed_"))
    for kind in ("unet", "dit"):
        part = f"train_{kind}"
        if part not in args.parts.split(","):
            continue
        channels = 3 if kind == "unet" else 4
        npz = mnist_npz(tmp / f"mnist32x{channels}.npz", channels, bench.smoke)
        for key, variant in VARIANTS.items():
            if (wanted is None and key not in ON_REQUEST) or (wanted and f"{kind}:sdeflow:{key}" in wanted):
                if key == "torchgn" and kind != "unet":
                    continue
                run = lambda v=variant, k=kind, f=npz: sdeflow_train_row(k, v, f, tmp, bench)  # noqa: E731
                bench.attempt(part, "sdeflow", variant, run)
        if kind == "unet" and (wanted is None or "unet:diffusers:example" in wanted):
            bench.attempt(part, "diffusers", "example loop", lambda f=npz: diffusers_example_unet_row(f, bench))
        for compiled in (False, True):
            if wanted is None or f"{kind}:diffusers:{'compile' if compiled else 'eager'}" in wanted:
                run = lambda c=compiled, k=kind, f=npz: diffusers_tuned_row(k, f, bench, c)  # noqa: E731
                bench.attempt(part, "diffusers", "tuned", run)
    write_report(bench.out)


if __name__ == "__main__":
    main()
