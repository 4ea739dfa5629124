"""CUDA code paths: training with bf16 + torch.compile, sampling, guidance, likelihood and the FID network on a GPU.

Skipped (with the reason printed) where no GPU is present, as in CI; run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize(
    "config, extra",
    [
        ("digits_edm", ["train.precision=bf16", "train.compile=true"]),
        ("digits_ddpm", ["train.precision=fp16"]),
        ("mnist_sd3", ["train.precision=bf16", "train.compile=true"]),
        ("mnist_rectified_flow", ["train.precision=bf16"]),
    ],
)
def test_training_on_gpu(config, extra, tmp_path):
    from pathlib import Path

    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / f"{config}.yaml",
        [
            f"out_dir={tmp_path}",
            "train.steps=30",
            "train.batch_size=64",
            "train.ckpt_every=15",
            "train.tensorboard=false",
            "sample.n=16",
            "sample.steps=4",
            *extra,
        ],
    )
    tr = Trainer(cfg, progress=False)
    assert tr.device.type == "cuda" and tr.dataset.x.device.type == "cuda"
    summary = tr.fit()
    assert summary["steps"] == 30 and torch.isfinite(torch.tensor(tr.losses)).all()
    assert (tmp_path / "samples.png").is_file()
    resumed = Trainer(cfg, resume=True, progress=False)
    assert resumed.step == 30


@pytest.mark.parametrize("extra", [[], ["train.activation_checkpointing=true", "train.compile=true"]])
def test_fsdp_one_rank_trains_and_resumes_on_gpu(extra, tmp_path):
    """FSDP2 on one GPU (a group of one rank, NCCL): bf16 parameters with fp32 reduction, sharded EMA and sharded
    checkpoints; killed after step 4 and resumed, the run ends where an uninterrupted one ends."""
    from sdeflow.checkpoint import find_latest, load_checkpoint
    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    def cfg(out):
        return load_config(None, [
            f"out_dir={out}", "data.name=digits", "model.kind=dit", "model.preset=DiT-S/2", "model.num_classes=10",
            "diffusion.recipe=edm", "train.steps=8", "train.batch_size=32", "train.ckpt_every=4",
            "train.precision=bf16", "train.parallel.strategy=fsdp", "train.tensorboard=false", "sample.n=4",
            "sample.steps=4", *extra,
        ])  # fmt: skip

    whole = Trainer(cfg(tmp_path / "whole"), progress=False)
    whole.fit()
    whole.close()
    killed = Trainer(cfg(tmp_path / "run"), progress=False, stop_after=4)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    killed.close()
    resumed = Trainer(cfg(tmp_path / "run"), progress=False, resume=True)
    assert resumed.step == 4 and resumed.runtime.sharded
    resumed.fit()
    resumed.close()
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(whole.losses), rtol=2e-2, atol=1e-3)
    a, b = (load_checkpoint(find_latest(p / "checkpoints")) for p in (tmp_path / "whole", tmp_path / "run"))
    assert a["meta"]["sharded"] and (tmp_path / "run" / "samples.png").is_file()
    for k, v in a["ema"].items():
        torch.testing.assert_close(b["ema"][k], v, rtol=2e-2, atol=2e-3, msg=k)


def test_training_steps_replayed_from_cuda_graphs_match_the_compiled_steps(tmp_path):
    """train.compile_mode reduce-overhead (forward and backward replayed from CUDA graphs, the batch copied into
    their static inputs) gives the losses and weights of the compiled steps without graphs."""
    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    def run(mode):
        cfg = load_config(None, [
            f"out_dir={tmp_path / mode}", "data.name=digits", "model.kind=unet", "model.preset=small",
            "model.num_classes=10", "diffusion.recipe=edm", "train.steps=12", "train.batch_size=64",
            "train.ckpt_every=0", "train.compile=true", f"train.compile_mode={mode}", "train.tensorboard=false",
            "train.sample_every=0", "sample.n=4", "sample.steps=4",
        ])  # fmt: skip
        tr = Trainer(cfg, progress=False)
        tr.fit()
        return tr

    plain, graphed = run("default"), run("reduce-overhead")
    torch.testing.assert_close(torch.tensor(graphed.losses), torch.tensor(plain.losses), rtol=1e-3, atol=1e-5)
    for (k, a), b in zip(plain.objective.net.state_dict().items(), graphed.objective.net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("compiled", [False, True])
def test_whole_step_cuda_graph_matches_the_eager_step_on_gpu(compiled, tmp_path):
    """train.cuda_graph: the whole step (two micro-batches, clipping, fused AdamW with a warm-up LR schedule,
    power EMA, or a fixed one with a start step) replayed from one CUDA graph gives the eager steps' losses, weights
    and EMA, and resumes. Channels-last, so our Triton GroupNorm kernels run inside the graph."""
    ema = "{kind: fixed, decay: 0.9, start_step: 3}" if compiled else "{kind: power, std: 0.1}"
    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    def cfg(name, graph, *extra):
        return load_config(None, [
            f"out_dir={tmp_path / name}", "data.name=digits", "model.kind=unet", "model.preset=small",
            "model.num_classes=10", "model.kwargs={dropout: 0.1}", "diffusion.recipe=edm", "train.steps=10",
            "train.batch_size=64", "train.grad_accum=2", "train.label_dropout=0.2", "train.warmup_steps=4",
            "train.lr=2e-3", "train.lr_schedule=cosine", f"train.ema={ema}", "train.ckpt_every=5",
            f"train.compile={str(compiled).lower()}", "train.precision=bf16", f"train.cuda_graph={graph}",
            "train.tensorboard=false", "sample.n=4", "sample.steps=4", "train.channels_last=true", *extra,
        ])  # fmt: skip

    eager = Trainer(cfg("eager", "false"), progress=False)
    eager.fit()
    graphed = Trainer(cfg("graphed", "true"), progress=False)
    graphed.fit()
    assert graphed.graphed.graph is not None
    torch.testing.assert_close(torch.tensor(graphed.losses), torch.tensor(eager.losses), rtol=2e-3, atol=1e-5)
    for (k, a), b in zip(eager.objective.state_dict().items(), graphed.objective.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4, msg=k)  # network and EMA
    lr = graphed.phases["model"].optimizer.param_groups[0]["lr"]
    assert (
        isinstance(lr, torch.Tensor)
        and lr.is_cuda
        and float(lr) == pytest.approx(eager.phases["model"].optimizer.param_groups[0]["lr"], rel=1e-6)
    )
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg("resumed", "true"), progress=False, stop_after=5).fit()
    resumed = Trainer(cfg("resumed", "true"), resume=True, progress=False)
    resumed.fit()
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(graphed.losses), rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize(
    "sampler",
    [
        "ddpm",
        "ddim",
        "euler",
        "heun",
        "edm_stochastic",
        "euler_maruyama",
        "pc",
        "dpmpp_2m",
        "dpmpp_3m",
        "dpmpp_2m_sde",
        "unipc",
        "flow_euler",
        "adaptive",
    ],
)
def test_samplers_on_gpu_match_cpu(sampler):
    from sdeflow import EDMProcess, GaussianMixture, sample
    from sdeflow.evaluation.metrics import sliced_wasserstein

    gm = GaussianMixture.grid_2d(3, 1.0, 0.1)
    gpu = sample(gm.to("cuda"), (4000, 2), EDMProcess(), sampler, steps=30, seed=0, device="cuda")
    assert gpu.samples.device.type == "cuda" and torch.isfinite(gpu.samples).all()
    ref = gm.to("cpu").sample(4000, torch.Generator().manual_seed(1))[0]
    assert sliced_wasserstein(gpu.samples.cpu(), ref) < 0.1
    if sampler in ("ddim", "euler", "heun", "dpmpp_2m", "unipc"):  # deterministic: same result as on the CPU
        x0 = EDMProcess().sample_prior((256, 2), torch.Generator().manual_seed(3))
        a = sample(gm.to("cuda"), (256, 2), EDMProcess(), sampler, steps=10, x_init=x0.cuda(), device="cuda")
        b = sample(gm.to("cpu"), (256, 2), EDMProcess(), sampler, steps=10, x_init=x0)
        torch.testing.assert_close(a.samples.cpu(), b.samples, rtol=1e-4, atol=1e-4)


def test_guidance_likelihood_and_discrete_schedule_on_gpu():
    from sdeflow import GaussianMixture, VPDiscreteProcess, sample
    from sdeflow.sampling.guidance import ClassifierFreeGuidance
    from sdeflow.sampling.likelihood import log_likelihood

    gm = GaussianMixture.random(4, 2, std=0.2, num_classes=2, seed=3).to("cuda")
    r = sample(
        ClassifierFreeGuidance(gm, 2.0),
        (512, 2),
        VPDiscreteProcess(),
        "ddim",
        steps=20,
        cond=torch.ones(512, dtype=torch.long, device="cuda"),
        seed=0,
        device="cuda",
    )
    assert torch.isfinite(r.samples).all()
    x = gm.sample(64, torch.Generator().manual_seed(0))[0].cuda()
    ll = log_likelihood(gm, x, 0.002, 1e4, divergence="exact", rtol=1e-6, atol=1e-6)
    assert float((ll.log_prob - gm.log_prob(x, 0.002)).abs().mean()) < 1e-3


def test_inception_on_gpu_matches_cpu():
    from sdeflow.evaluation.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    x = torch.rand(4, 3, 32, 32)
    cpu = net(x)
    gpu = net.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2e-3, atol=2e-3)


def test_cuda_graph_and_compiled_denoisers_match_eager():
    from sdeflow import Denoiser, EDMProcess, accelerate_denoiser, sample
    from sdeflow.models import UNet

    torch.manual_seed(0)
    net = UNet.preset("small_attn", img_resolution=16, in_channels=3, model_channels=32, num_classes=4)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    den = Denoiser(net.cuda().eval(), EDMProcess())
    y = torch.arange(8, device="cuda") % 4
    ref = sample(den, (8, 3, 16, 16), EDMProcess(), "dpmpp_2m", steps=6, cond=y, seed=0, device="cuda").samples
    graphed = accelerate_denoiser(den, cuda_graphs=True)
    out = sample(graphed, (8, 3, 16, 16), EDMProcess(), "dpmpp_2m", steps=6, cond=y, seed=0, device="cuda").samples
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # one graph, replayed 6 times
    assert len(graphed.graphs) == 1
    fast = accelerate_denoiser(den, "bf16", compile=True, cuda_graphs=True)
    out = sample(fast, (8, 3, 16, 16), EDMProcess(), "dpmpp_2m", steps=6, cond=y, seed=0, device="cuda").samples
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp_2m", "euler_maruyama"])
def test_whole_sampler_loop_in_one_cuda_graph_equals_sample(sampler):
    """CUDAGraphSampler: the whole run (initial noise, every evaluation, the solver's arithmetic and, for
    Euler–Maruyama, its fresh noise) replayed from one graph returns sample(..., seed=...)'s samples, for other
    seeds and conditions than the captured ones, from one graph per shape."""
    from sdeflow import CUDAGraphSampler, Denoiser, EDMProcess, sample
    from sdeflow.models import UNet

    torch.manual_seed(0)
    net = UNet.preset("small_attn", img_resolution=16, in_channels=3, model_channels=32, num_classes=4)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    den = Denoiser(net.cuda().eval(), EDMProcess())
    graphed = CUDAGraphSampler(den, EDMProcess(), sampler, steps=6)
    for seed, first in ((0, 1), (5, 2)):
        y = (torch.arange(4, device="cuda") + first) % 4
        ref = sample(den, (4, 3, 16, 16), EDMProcess(), sampler, steps=6, cond=y, seed=seed, device="cuda").samples
        out = graphed((4, 3, 16, 16), cond=y, seed=seed)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(graphed.graphs) == 1


def test_trainer_gpu_fast_paths(tmp_path):
    """Fused optimizer, channels-last UNet, cuDNN-first attention in a DiT: the run trains and resumes."""
    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    for kind, extra in (("unet", ["train.channels_last=true"]), ("dit", ["model.preset=DiT-S/4"])):
        cfg = load_config(
            None,
            [
                f"out_dir={tmp_path / kind}",
                "data.name=digits",
                "data.resolution=16",
                f"model.kind={kind}",
                *(["model.preset=small_attn"] if kind == "unet" else []),
                "model.num_classes=10",
                "train.steps=6",
                "train.batch_size=32",
                "train.precision=bf16",
                "train.compile=true",
                "train.ckpt_every=3",
                "train.tensorboard=false",
                "sample.n=8",
                "sample.steps=3",
                *extra,
            ],
        )
        tr = Trainer(cfg, progress=False)
        assert tr.phases["model"].optimizer.defaults.get("fused") is True
        tr.fit()
        assert torch.isfinite(torch.tensor(tr.losses)).all()
        assert Trainer(cfg, resume=True, progress=False).step == 6


@pytest.mark.parametrize("config", ["shapes_unet_text", "shapes_mmdit"])
def test_text_to_image_on_gpu_fast_paths(config, tmp_path):
    """bf16 + channels-last + torch.compile training on captions, then CUDA-graph and compiled sampling from
    prompts with guidance, against eager sampling."""
    from pathlib import Path

    from sdeflow import accelerate_denoiser, sample_prompts
    from sdeflow.builders import load
    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    over = [f"out_dir={tmp_path}", "train.steps=20", "train.batch_size=32", "train.ckpt_every=0",
            "data.num_samples=256", "train.tensorboard=false", "sample.n=8", "sample.steps=4", "train.compile=true",
            f"text.encoder={os.environ.get('SDEFLOW_TEXT_ENCODER', 'minilm')}"]  # fmt: skip
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{config}.yaml", over)
    summary = Trainer(cfg, progress=False).fit()
    assert summary["steps"] == 20 and torch.isfinite(torch.tensor(summary["final_loss"]))
    m = load(summary["checkpoint"], device="cuda")
    prompts = ["a red circle above a blue square", "two small green crosses", "a cyan triangle at the top left"]

    def draw(den):
        return sample_prompts(den, m.text_encoder, prompts, m.data_shape, m.process, guidance=4.0, sampler="dpmpp_2m",
                              steps=5, seed=0, device="cuda").samples  # fmt: skip

    ref = draw(m.denoiser)
    graphed = accelerate_denoiser(m.denoiser, cuda_graphs=True)
    torch.testing.assert_close(draw(graphed), ref, rtol=1e-4, atol=1e-4)
    fast = draw(accelerate_denoiser(m.denoiser, "bf16", compile=True, cuda_graphs=True))
    assert (fast - ref).abs().max() < 0.1 * ref.abs().max()
