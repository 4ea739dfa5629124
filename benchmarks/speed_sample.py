"""Sampling speed side by side with diffusers, in one run: images/s at NFE 20, batch 256, of DDIM with the
CIFAR-size UNet. diffusers' ``DDIMPipeline`` (fp32 as shipped, bf16, bf16 with cuDNN autotuning) against sdeflow's
``ddim`` in bf16: eager, CUDA graphs, compiled, channels-last (with PyTorch's GroupNorm and with sdeflow's), bf16
weights, each compiled variant also replayed from CUDA graphs. The compiled rows carry a kernel profile of a batch.

    python benchmarks/speed_sample.py [--autotune] [--append]
    python benchmarks/speed_sample.py --best 256,4,1 --append   # each library at its best, batch by batch

Writes ``speed_sample.{json,md}`` and ``speed_sample_profile.md`` under ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from speed_models import diffusers_unet, size, use_torch_group_norm
from speed_tables import speed_tables
from timing import Bench, forward_flops_per_image, free, load_results, profile, profile_markdown, start, time_steps


def sdeflow_unet(bench: Bench) -> tuple:
    """(process, ε-denoiser, parameter count) of sdeflow's benchmark UNet on the discrete VP chain, with weights
    drawn N(0, 0.02²) so that the network is not degenerate (its output layer is zero-initialised)."""
    from sdeflow import Denoiser, VPDiscreteProcess
    from sdeflow.models import UNet

    s = size("unet", bench.smoke)
    net = UNet.preset(
        "ddpmpp_cifar10", dropout=0.0, model_channels=s["ch"], channel_mult=s["mult"], num_blocks=s["blocks"]
    )
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    process = VPDiscreteProcess()
    return process, Denoiser(net.to(bench.device).eval(), process, "eps"), sum(p.numel() for p in net.parameters())


def sampling_rows(bench: Bench, nfe: int = 20, autotune: bool = False) -> Iterator[dict]:
    """Rows one by one (each is saved as it comes): diffusers' DDIMPipeline in fp32 and bf16, then sdeflow's
    DDIM eager / CUDA graphs / compile / both, and with ``autotune`` channels-last, bf16 weights and a
    max-autotune compilation. The compiled rows and diffusers' bf16 row carry a kernel profile of one batch."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from sdeflow import CUDAGraphDenoiser, accelerate_denoiser, sample
    from sdeflow.models.layers import set_attention_backend

    dev, peak = bench.device, bench.peak
    b = bench.n(256, 4)
    reps = bench.n(3, 1)

    flops: dict[str, float] = {}  # per image and network evaluation, by library

    def timed(fn: Callable[[], object], lib: str, variant: str, params: float, profiled: bool = False) -> dict:
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
        if profiled and dev.type == "cuda":
            r["profile"] = profile(fn, dev, steps=1)
        return r

    set_attention_backend("default")
    torch.manual_seed(0)
    unet = diffusers_unet(bench.smoke).to(dev).eval()
    n_diff = sum(p.numel() for p in unet.parameters())
    t = torch.tensor([10, 20], device=dev)
    flops["diffusers"] = forward_flops_per_image(lambda x, u=unet: u(x, t), (3, 32, 32), dev)
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        pipe = DDIMPipeline(unet=unet.to(dtype), scheduler=DDIMScheduler(num_train_timesteps=1000))
        pipe.set_progress_bar_config(disable=True)
        # "pt": the pipeline's numpy/PIL conversion fails for bf16; the host copy is ours, on both sides
        run = lambda p=pipe: p(batch_size=b, num_inference_steps=nfe, output_type="pt").images.float().cpu()  # noqa: E731
        yield timed(run, "diffusers", f"DDIMPipeline {name}, eager", n_diff, profiled=name == "bf16")
        if name == "bf16" and dev.type == "cuda":  # the cuDNN autotuning that sdeflow's rows get, given to diffusers
            torch.backends.cudnn.benchmark = True
            yield timed(run, "diffusers", "DDIMPipeline bf16, eager, cudnn.benchmark", n_diff)
            torch.backends.cudnn.benchmark = False
        del pipe, run
    del unet
    free()

    set_attention_backend("auto", dev)
    process, den, n_ours = sdeflow_unet(bench)
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
            yield timed(ddim(fast), "sdeflow", f"ddim {variant}", n_ours, profiled=True)
            if cuda:
                yield timed(ddim(CUDAGraphDenoiser(fast)), "sdeflow", f"ddim {variant} + CUDA graphs", n_ours)
        except Exception as e:  # a failing variant is recorded, the next one runs
            yield {"part": "sample_unet", "library": "sdeflow", "variant": f"ddim {variant}", "error": f"{e}"[:300]}
        fast = None
        free()


def best_rows(bench: Bench, batches: list[int], nfe: int = 20) -> Iterator[dict]:
    """Each library at its best, batch by batch (batch 1 and 4: interactive latency): diffusers' UNet with the
    speed recipe its documentation gives (bf16 weights, channels-last, fused QKV where offered, ``torch.compile``
    with CUDA graphs (reduce-overhead, fullgraph), cuDNN autotuning) in its ``DDIMPipeline``, against sdeflow's DDIM
    with bf16 weights, channels-last, compile and CUDA graphs. Each batch compiles afresh (no dynamic shapes)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from sdeflow import CUDAGraphDenoiser, CUDAGraphSampler, accelerate_denoiser
    from sdeflow.models.layers import set_attention_backend, set_norm_backend

    dev, cuda = bench.device, bench.device.type == "cuda"
    torch.backends.cudnn.benchmark = cuda
    for b in batches:
        part = f"sample_best_b{b}"
        torch._dynamo.reset()
        set_attention_backend("default")
        torch.manual_seed(0)
        unet = diffusers_unet(bench.smoke).to(dev).eval().to(torch.bfloat16).to(memory_format=torch.channels_last)
        fused = hasattr(unet, "fuse_qkv_projections")
        if fused:
            unet.fuse_qkv_projections()
        n_diff = sum(p.numel() for p in unet.parameters())
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
        pipe.set_progress_bar_config(disable=True)
        pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead" if cuda else None, fullgraph=True)
        run = lambda p=pipe, b=b: p(batch_size=b, num_inference_steps=nfe, output_type="pt").images.float().cpu()  # noqa: E731
        variant = "bf16 weights, channels-last, " + ("fused QKV, " if fused else "") + "compile (reduce-overhead)"
        yield _best_row(run, bench, part, "diffusers", f"DDIMPipeline {variant}", n_diff, b, nfe)
        del pipe, run, unet
        free()
        set_attention_backend("auto", dev)
        process, den, n_ours = sdeflow_unet(bench)
        fast = accelerate_denoiser(den, "bf16", compile=True, channels_last=True, cast_weights=True)
        run = _ddim_run(CUDAGraphDenoiser(fast) if cuda else fast, process, b, nfe, dev)
        yield _best_row(run, bench, part, "sdeflow", "ddim bf16 weights, channels-last, compile + CUDA graphs", n_ours,
                        b, nfe)  # fmt: skip
        if cuda:  # the whole loop, solver arithmetic included, in one graph; GroupNorm as our Triton operator
            # (the default on CUDA) and as Inductor compiles our PyTorch formulation of it
            for norms, label in (("auto", ""), ("torch", ", norms by Inductor")):
                old_norms = set_norm_backend(norms)
                try:
                    fast = accelerate_denoiser(den, "bf16", compile=True, channels_last=True, cast_weights=True)
                    whole = CUDAGraphSampler(fast, process, "ddim", steps=nfe)
                    run = lambda w=whole, b=b: w((b, 3, 32, 32), seed=0).float().cpu()  # noqa: E731
                    variant = f"ddim bf16 weights, channels-last, compile, whole sampler loop in one CUDA graph{label}"
                    yield _best_row(run, bench, part, "sdeflow", variant, n_ours, b, nfe)
                finally:  # the next batch's rows run with the default again, whatever happened here
                    set_norm_backend(old_norms)
                del whole
        del fast, den, run
        free()


def _ddim_run(model: Callable, process: object, b: int, nfe: int, dev: torch.device) -> Callable[[], torch.Tensor]:
    from sdeflow import sample

    return lambda: sample(model, (b, 3, 32, 32), process, "ddim", steps=nfe, seed=0, device=dev).samples.float().cpu()


def _best_row(run: Callable, bench: Bench, part: str, lib: str, variant: str, params: int, b: int, nfe: int) -> dict:
    """Timed after a warm-up of 3 runs (compile, graph recording, autotuning); on a GPU with the kernel profile of
    a run, whose summed kernel time is the latency's floor (``wall_over_kernels``: how far above it the run is)."""
    m = time_steps(run, bench.device, 3, 1, bench.n(5, 1), graphs=True)
    row = {"part": part, "library": lib, "variant": variant, "params_M": round(params / 1e6, 2), "batch": b,
           "nfe": nfe, "images_per_s": b / m["sec"], "seconds_per_batch": m["sec"], "ms_per_image": m["sec"] / b * 1e3,
           "spread": m["spread"], "peak_mem_GiB": m["mem"], "warmup_s": round(m["warmup_s"], 1)}  # fmt: skip
    if bench.device.type == "cuda":
        row["profile"] = kernels = profile(run, bench.device, steps=3)
        row["wall_over_kernels"] = m["sec"] * 1e3 / kernels["kernel_ms_per_step"]
    return row


def write_report(out: Path) -> None:
    metas, rows = load_results(out, "speed_sample")
    (out / "speed_sample.md").write_text(
        speed_tables(metas, rows, "Sampling speed: sdeflow and diffusers side by side")
    )
    title = "Kernel profiles: sdeflow's and diffusers' sampling runs (GPU kernel time)"
    (out / "speed_sample_profile.md").write_text(profile_markdown(rows, title))
    print((out / "speed_sample.md").read_text())


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--autotune", action="store_true", help="also sample with a max-autotune compilation")
    ap.add_argument("--best", help="only each library at its best, at these batches (e.g. 256,4,1)")


def main() -> None:
    bench, args = start("speed_sample", __doc__, _args)
    if bench is None:
        return write_report(Path(args.out))
    try:
        rows = best_rows(bench, [int(v) for v in args.best.split(",")]) if args.best else None
        for r in rows or sampling_rows(bench, autotune=args.autotune):
            bench.add(r)
    except Exception as e:  # a failure outside one variant: recorded, the report still written
        bench.add({"part": "sample_unet", "library": "?", "variant": "?", "error": f"{type(e).__name__}: {e}"[:300]})
    write_report(bench.out)


if __name__ == "__main__":
    main()
