"""Guidance against hand computations: the classifier-free mix at the interval's ends, classifier guidance's
gradient of a softmax-linear classifier in closed form, and the noisy classifier's training draws."""

import math

import pytest
import torch

from sdeflow.core.mixture import NULL_LABEL
from sdeflow.sampling.guidance import ClassifierFreeGuidance, ClassifierGuidance, train_noisy_classifier

F64 = torch.float64


def toy_denoiser(x, sigma, cond):
    """D = σ·x + label (label −1 for ∅): conditional and unconditional outputs differ by label + 1."""
    return sigma.reshape(-1, 1) * x + cond.reshape(-1, 1).to(x.dtype)


def test_cfg_mixes_by_hand_and_only_inside_a_closed_interval():
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=F64)
    cond = torch.tensor([0, 1, 2, 3])
    sigma = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=F64)
    w = 1 / 3  # not exact in float32: the mix must be taken in the data's dtype
    d_u, d_c = toy_denoiser(x, sigma, torch.full((4,), NULL_LABEL)), toy_denoiser(x, sigma, cond)
    torch.testing.assert_close(ClassifierFreeGuidance(toy_denoiser, w)(x, sigma, cond), d_u + w * (d_c - d_u),
                               rtol=1e-15, atol=0)  # fmt: skip
    guided = ClassifierFreeGuidance(toy_denoiser, 3.0, interval=(1.0, 2.0))(x, sigma, cond)
    inside = torch.tensor([False, True, True, False])[:, None]
    torch.testing.assert_close(guided, torch.where(inside, d_u + 3 * (d_c - d_u), d_c))
    scalar = ClassifierFreeGuidance(toy_denoiser, 2.0)(x, torch.tensor(0.5, dtype=F64), cond)
    torch.testing.assert_close(scalar, (lambda u, c: u + 2 * (c - u))(toy_denoiser(x, sigma[:1].expand(4),
        torch.full((4,), NULL_LABEL)), toy_denoiser(x, sigma[:1].expand(4), cond)))  # fmt: skip


def test_cfg_checks():
    with pytest.raises(
        ValueError, match=r"^classifier-free guidance needs a condition \(class labels or encoded prompts\)$"
    ):
        ClassifierFreeGuidance(toy_denoiser, 2.0)(torch.zeros(1, 1), torch.ones(1))
    for bad in ((1.0, 1.0), (2.0, 1.0), (1.0,)):
        with pytest.raises(ValueError, match="the guidance interval must be"):
            ClassifierFreeGuidance(toy_denoiser, 2.0, interval=bad)


W = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]], dtype=F64)  # x (B, 2) → logits (B, 3)


def classifier(x, sigma):
    return torch.log_softmax(x @ W / sigma.reshape(-1, 1), dim=1)


def test_classifier_guidance_adds_scale_sigma_squared_times_the_log_prob_gradient():
    """∇_x log softmax(xW/σ)_y = (W_y − Σ_k p_k W_k)/σ; D_s = D(x, σ, ∅) + s σ² ∇ (default s = 1)."""
    x = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=F64)
    y = torch.tensor([2, 0])
    calls = []

    def denoiser(x, sigma, cond):  # no default for cond: guidance must pass ∅ itself
        assert sigma.shape == (len(x),)  # a scalar σ reaches the denoiser as one σ per sample
        calls.append(cond)
        return (0.5 * x).float()  # a low-precision model's output

    for sigma in (torch.tensor([0.5, 2.0], dtype=F64), torch.tensor(2.0, dtype=F64)):
        s = sigma.expand(2)
        p = torch.softmax(x @ W / s[:, None], 1)
        grad = (W[:, y].T - p @ W.T) / s[:, None]
        want = (0.5 * x).float() + (s[:, None] ** 2 * grad).float()
        got = ClassifierGuidance(denoiser, classifier)(x, sigma, y)
        assert got.dtype == torch.float32 and calls[-1] is None
        torch.testing.assert_close(got, want)
        half = ClassifierGuidance(denoiser, classifier, scale=0.5)(x, sigma, y)
        torch.testing.assert_close(half, (0.5 * x).float() + 0.5 * (s[:, None] ** 2 * grad).float())
    with pytest.raises(ValueError, match=r"^classifier guidance needs class labels \(cond\)$"):
        ClassifierGuidance(denoiser, classifier)(x, sigma)


def test_noisy_classifier_training_setup(monkeypatch):
    """Defaults (1000 steps of 256, lr 1e-3, ln σ ~ U(ln 0.002, ln 80), seed 0, weight decay 0.01), classes =
    max label + 1, and the noisy inputs x̃ = x + σ ε drawn σ first from the step's generator."""
    import sdeflow.models.classifier as mc

    seen = {}

    def fake_fit(clf, x, y, steps, batch, lr, seed, device, weight_decay, inputs):
        seen.update(clf=clf, steps=steps, batch=batch, lr=lr, seed=seed, device=device, wd=weight_decay, inputs=inputs)
        return clf

    monkeypatch.setattr(mc, "fit_classifier", fake_fit)
    x, y = torch.zeros(5, 4), torch.tensor([0, 1, 2, 3, 1])
    train_noisy_classifier(x, y, width=8)
    assert (seen["steps"], seen["batch"], seen["lr"], seen["seed"], seen["device"], seen["wd"]) == (
        1000, 256, 1e-3, 0, "cpu", 0.01)  # fmt: skip
    assert seen["clf"].num_classes == 4 and seen["clf"](x, torch.ones(5)).shape == (5, 4)
    assert sum(p.numel() for p in seen["clf"].parameters()) < sum(
        p.numel() for p in mc.NoisyClassifier((4,), 4).parameters())  # width=8 reached the classifier  # fmt: skip
    xb = torch.ones(3, 4)
    got, sigma = seen["inputs"](xb, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    lo, hi = math.log(0.002), math.log(80.0)
    want_sigma = torch.exp(lo + (hi - lo) * torch.rand(3, generator=g))
    torch.testing.assert_close(sigma, want_sigma)
    torch.testing.assert_close(got, xb + want_sigma[:, None] * torch.randn(3, 4, generator=g))
