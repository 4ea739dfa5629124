"""Latent diffusion and the baselines through the loop: diffusers' AutoencoderKL read to 1e-5, latent caching equal
to encoding on the fly bit for bit, two-optimizer kill-and-resume, the objectives' losses against their parts,
sampling and evaluation through the CLI, and bad input."""

import math
from pathlib import Path

import pytest
import torch

from helpers import kill_and_resume
from sdeflow.builders import load, load_autoencoder
from sdeflow.checkpoint import CheckpointError, find_latest
from sdeflow.cli import main
from sdeflow.config import ConfigError, load_config
from sdeflow.models.autoencoder import AutoencoderKL
from sdeflow.sampling.likelihood import bits_per_dim
from sdeflow.training import Trainer
from sdeflow.training.autoencoder import dequantize_batch
from sdeflow.training.objectives import load_objective

ROOT = Path(__file__).resolve().parents[1]
BASE = ["data.name=digits", "data.resolution=8", "train.batch_size=8", "train.ckpt_every=2", "train.log_every=1",
        "train.tensorboard=false", "sample.n=4", "sample.steps=2", "train.ema.kind=none"]  # fmt: skip
AE = ["objective=autoencoder", "autoencoder.channels=[8,16]", "autoencoder.groups=4", "autoencoder.latent_channels=2"]
UNET = ["model.kind=unet", "model.preset=null",
        "model.kwargs={model_channels: 8, channel_mult: [1], num_blocks: 1, attn_resolutions: []}"]  # fmt: skip


def cfg(tmp, name, *extra, steps=4):
    return load_config(None, [*BASE, f"train.steps={steps}", f"out_dir={tmp / name}", *extra])


@pytest.fixture(scope="module")
def kl_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ae")
    Trainer(cfg(tmp, "kl", *AE, steps=2), progress=False).fit()
    return find_latest(tmp / "kl" / "checkpoints")


def _state(objective):
    return {k: v.clone() for k, v in objective.state_dict().items()}


def _same(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize(
    "extra",
    [
        [*AE, "autoencoder.disc_weight=0.5", "autoencoder.disc_start=2", "autoencoder.disc_layers=1",
         "autoencoder.disc_width=8", "autoencoder.disc_loss=wgan_gp"],
        [*AE, "autoencoder.kind=vq", "autoencoder.codebook_size=8", "autoencoder.disc_weight=0.1",
         "autoencoder.disc_layers=1", "autoencoder.disc_width=8", "train.ema.kind=fixed"],
        ["objective=gan", "gan.width=8", "gan.z_dim=4"],
        ["objective=flow", "flow.hidden=8", "flow.steps=2", "train.ema.kind=fixed"],
    ],
    ids=["kl-wgan", "vqgan", "gan", "flow"],
)  # fmt: skip
def test_two_optimizer_kill_and_resume_is_bitwise_identical(tmp_path, extra):
    a, b, resumed_at = kill_and_resume(cfg(tmp_path, "a", *extra, steps=6), cfg(tmp_path, "b", *extra, steps=6))
    assert resumed_at == 2  # killed after step 3; the last checkpoint is step 2's
    for name in a.phases:
        sa, sb = a.phases[name].optimizer.state_dict()["state"], b.phases[name].optimizer.state_dict()["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_discriminator_waits_for_its_start(tmp_path):
    extra = [*AE, "autoencoder.disc_weight=1", "autoencoder.disc_start=3", "autoencoder.disc_layers=1",
             "autoencoder.disc_width=8"]  # fmt: skip
    t = Trainer(cfg(tmp_path, "d", *extra, steps=4), progress=False)
    d0 = {k: v.clone() for k, v in t.objective.nets["discriminator"].state_dict().items()}
    for _ in range(3):
        t.train_step()
    _same(d0, t.objective.nets["discriminator"].state_dict())  # steps 0, 1, 2: untouched
    t.train_step()
    assert not torch.equal(d0["net.0.weight"], t.objective.nets["discriminator"].state_dict()["net.0.weight"])


def test_latent_cache_trains_bitwise_as_encoding_on_the_fly(tmp_path, kl_checkpoint):
    ldm = [*UNET, f"diffusion.autoencoder={kl_checkpoint}"]
    fly = Trainer(cfg(tmp_path, "fly", *ldm), progress=False)
    fly.fit()
    cached = Trainer(cfg(tmp_path, "cache", *ldm, "diffusion.cache_latents=true"), progress=False)
    cached.fit()
    shards = list((tmp_path / "cache" / "latents").glob("*/shard_*.safetensors"))
    assert len(shards) == 1 and cached.dataset.x.shape == (1797, 4, 4, 4)  # μ and log σ² of 2 channels at 4×4
    assert fly.losses == cached.losses
    _same(_state(fly.objective.net), _state(cached.objective.net))
    again = Trainer(cfg(tmp_path, "cache", *ldm, "diffusion.cache_latents=true"), progress=False, overwrite=True)
    assert torch.equal(again.dataset.x, cached.dataset.x)  # read back from the shards


def test_latent_diffusion_trains_on_scaled_posterior_samples(tmp_path, kl_checkpoint):
    t = Trainer(cfg(tmp_path, "ldm", *UNET, f"diffusion.autoencoder={kl_checkpoint}"), progress=False)
    ae = t.objective.autoencoder
    batch = t.stream.batch(0, 0)
    x0 = t.objective.clean_data(batch)
    g = torch.Generator().manual_seed(batch.generator.initial_seed())
    torch.rand((2, 8), generator=g)  # the stream's label-dropout and flip draws come first
    eps = torch.randn((8, 2, 4, 4), generator=g)
    with torch.no_grad():
        mean, logvar = AutoencoderKL.split(ae.moments(batch.x))
    torch.testing.assert_close(x0, (mean + torch.exp(0.5 * logvar) * eps) * ae.scaling_factor)
    assert t.data_shape == (2, 4, 4) and ae.scaling_factor != 1.0


def test_latent_sampling_decodes_and_eval_runs_on_decoded_images(tmp_path, kl_checkpoint):
    t = Trainer(cfg(tmp_path, "ldm", *UNET, f"diffusion.autoencoder={kl_checkpoint}", steps=2), progress=False)
    t.fit()
    ck = find_latest(tmp_path / "ldm" / "checkpoints")
    m = load(ck)
    z = torch.randn(3, 2, 4, 4)
    ae = load_autoencoder(kl_checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(m.decode(z), ae.decode(z / ae.scaling_factor))
    assert main(["sample", str(ck), "--n", "4", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    import numpy as np

    assert np.load(tmp_path / "s" / "samples.npz")["x"].shape == (4, 1, 8, 8)  # images, not latents
    assert main(["eval", str(ck), "--n", "20", "--samplers", "euler", "--nfe", "2", "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "eval.json").is_file()


def test_diffusers_autoencoder_kl_reads_to_1e5(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=2,
        norm_num_groups=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()  # fmt: skip
    with torch.no_grad():  # random non-trivial norms and biases, so every parameter matters
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "vae")
    ours = load_autoencoder(tmp_path / "vae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        moments = ours.moments(x)
        mean, logvar = AutoencoderKL.split(moments)
        torch.testing.assert_close(mean, post.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logvar, post.logvar, atol=1e-5, rtol=1e-5)
        z = post.mean
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=1e-5)
    assert ours.scaling_factor == pytest.approx(ref.config.scaling_factor)


def test_objective_losses_equal_their_parts(tmp_path):
    # flow: the loss is the bits/dim of the dequantised batch under the flow's exact log-likelihood
    f = Trainer(cfg(tmp_path, "flow", "objective=flow", "flow.hidden=8", "flow.steps=2"), progress=False)
    f.objective.train()
    batch = f.stream.batch(0, 0)
    loss = f.objective.loss(batch, "model")
    g = torch.Generator().manual_seed(batch.generator.initial_seed())
    torch.rand((2, 8), generator=g)
    u = torch.rand((8, 1, 8, 8), generator=g)
    with torch.no_grad():
        lp = f.objective.flow.log_prob(dequantize_batch(batch.x, u))
    assert loss.item() == pytest.approx(bits_per_dim(lp, 64).mean().item(), rel=1e-5)
    # VAE: with kl_weight 1 and the Gaussian likelihood the loss is −ELBO per dimension in nats
    v = Trainer(cfg(tmp_path, "vae", *AE, "autoencoder.reconstruction=gaussian", "autoencoder.kl_weight=1"),
                progress=False)  # fmt: skip
    batch = v.stream.batch(0, 0)
    loss = v.objective.loss(batch, "model")
    g = torch.Generator().manual_seed(batch.generator.initial_seed())
    torch.rand((2, 8), generator=g)
    eps, u = torch.randn((8, 2, 4, 4), generator=g), torch.rand((8, 1, 8, 8), generator=g)
    ae = v.objective.autoencoder
    with torch.no_grad():
        m = ae.moments(batch.x)
        recon = ae.decode(ae.latent(m, eps))
        target = dequantize_batch(batch.x, u)
        nll = (0.5 * (target - recon).square() + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)  # σ = 1 at start
    assert loss.item() == pytest.approx(((nll + ae.kl(m)) / 64).mean().item(), rel=1e-5)


def test_generators_evaluate_through_sdeflow_eval(tmp_path):
    for name, extra in (("gan", ["objective=gan", "gan.width=8"]), ("flow", ["objective=flow", "flow.hidden=8"])):
        Trainer(cfg(tmp_path, name, *extra, steps=2), progress=False).fit()
        ck = find_latest(tmp_path / name / "checkpoints")
        objective, _ = load_objective(ck)
        x, _ = objective.generate(5, 0)
        assert x.shape == (5, 1, 8, 8) and torch.isfinite(x).all()
        assert main(["eval", str(ck), "--n", "20", "--out", str(tmp_path / f"e_{name}")]) == 0
        assert f"| {name} |" in (tmp_path / f"e_{name}" / "eval.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        ([*AE, "autoencoder.kind=vq", "autoencoder.codebook_size=0"], "autoencoder.codebook_size"),
        ([*AE, "autoencoder.disc_weight=0.5", "autoencoder.disc_start=4"], "autoencoder.disc_start"),
        ([*AE, "autoencoder.channels=[8,10]"], "autoencoder.channels"),
        (["diffusion.cache_latents=true"], "diffusion.cache_latents needs diffusion.autoencoder"),
    ],
)
def test_bad_autoencoder_configs_name_the_field(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        cfg(tmp_path, "bad", *extra)


def test_bad_latent_setups_name_the_field_or_file(tmp_path, kl_checkpoint, capsys):
    with pytest.raises(CheckpointError, match=r"autoencoder checkpoint not found.*diffusion.autoencoder"):
        Trainer(cfg(tmp_path, "x", *UNET, f"diffusion.autoencoder={tmp_path / 'nowhere'}"), progress=False)
    bad = [*UNET[:2], "model.kwargs={model_channels: 8, channel_mult: [1], num_blocks: 1, in_channels: 1}"]
    with pytest.raises(ConfigError, match="model.kwargs.in_channels = 1 does not fit"):
        Trainer(cfg(tmp_path, "y", *bad, f"diffusion.autoencoder={kl_checkpoint}"), progress=False)
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint.*\(diffusion.autoencoder\)"):
        Trainer(cfg(tmp_path, "z", *UNET, f"diffusion.autoencoder={tmp_path}"), progress=False)
    # an autoencoder swapped under a trained latent model is refused on load, naming the field
    import shutil

    ae_dir = tmp_path / "my_ae"
    shutil.copytree(kl_checkpoint, ae_dir)
    Trainer(cfg(tmp_path, "ldm", *UNET, f"diffusion.autoencoder={ae_dir}", steps=2), progress=False).fit()
    ldm = find_latest(tmp_path / "ldm" / "checkpoints")
    load(ldm)
    with pytest.raises(CheckpointError, match="not 'autoencoder'"):
        Trainer(cfg(tmp_path, "z", *UNET, f"diffusion.autoencoder={ldm}"), progress=False)
    for latent_channels, message in ((2, "weights differ"), (3, "latent channels")):
        Trainer(cfg(tmp_path, f"kl{latent_channels}", *AE, f"autoencoder.latent_channels={latent_channels}",
                    "seed=1", steps=2), progress=False).fit()  # fmt: skip
        shutil.rmtree(ae_dir)
        shutil.copytree(find_latest(tmp_path / f"kl{latent_channels}" / "checkpoints"), ae_dir)
        with pytest.raises(CheckpointError, match=message):
            load(ldm)
    with pytest.raises(CheckpointError, match="not 'autoencoder'"):
        Trainer(cfg(tmp_path, "z", *UNET, f"diffusion.autoencoder={ldm}"), progress=False)
    assert main(["eval", str(kl_checkpoint), "--n", "10", "--out", str(tmp_path / "e")]) != 0
    assert "draws no samples" in capsys.readouterr().err
    rc = main(["train", str(ROOT / "configs" / "mnist_vqgan.yaml"), "--set", "autoencoder.codebook_size=0",
               "--out", str(tmp_path / "cli")])  # fmt: skip
    assert rc != 0 and "autoencoder.codebook_size" in capsys.readouterr().err


def test_cli_trains_a_vqgan_and_writes_reconstructions_and_codebook_plot(tmp_path, capsys):
    sets = [*BASE, "train.steps=2", "autoencoder.channels=[8,16]", "autoencoder.groups=4",
            "autoencoder.codebook_size=8", "autoencoder.perceptual_weight=0", "autoencoder.disc_start=1",
            "autoencoder.disc_layers=1", "train.precision=fp32"]  # fmt: skip
    argv = ["train", str(ROOT / "configs" / "mnist_vqgan.yaml"), "--out", str(tmp_path / "vq"), "--quiet"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    assert (tmp_path / "vq" / "reconstructions.png").is_file() and (tmp_path / "vq" / "codebook_usage.png").is_file()
    import json

    summary = json.loads((tmp_path / "vq" / "summary.json").read_text())
    assert summary["codebook_size"] == 8 and 1 <= summary["codes_used"] <= 8 and summary["psnr"] > 0


@pytest.mark.parametrize("name", ["mnist_ae_kl", "mnist_vqgan", "mnist_ldm", "mnist_vae", "mnist_gan", "mnist_flow"])
def test_shipped_configs_validate(name):
    c = load_config(ROOT / "configs" / f"{name}.yaml")
    assert c.data.name == "mnist" and c.data.split == "fit"
