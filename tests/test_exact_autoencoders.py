"""The formulas of the autoencoders, the GAN and the flow objective against hand computations, closed forms and
autograd: KL, VQ straight-through and EMA update, GAN losses, WGAN-GP, the adaptive weight, the perceptual
distance, PSNR, the Gaussian likelihood, dequantisation and the latent scaling factor."""

import math

import pytest
import torch
from torch import nn

from sdeflow.models.autoencoder import AutoencoderKL, VQAutoencoder, gaussian_kl
from sdeflow.models.quantizer import VectorQuantizer, perplexity
from sdeflow.training.adversarial import (
    PerceptualLoss,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
)
from sdeflow.training.autoencoder import GaussianLikelihood, dequantize_batch, psnr


def test_gaussian_kl_matches_closed_form_and_torch_distributions():
    mean, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[math.log(0.25), math.log(4.0)]])
    # ½(μ² + σ² − 1 − log σ²) per dim: ½(0.25 + 0.25 − 1 − log 0.25) + ½(1 + 4 − 1 − log 4)
    hand = 0.5 * (0.25 + 0.25 - 1 - math.log(0.25)) + 0.5 * (1 + 4 - 1 - math.log(4))
    assert gaussian_kl(mean, logvar).item() == pytest.approx(hand, rel=1e-6)
    m, lv = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    q = torch.distributions.Normal(m, torch.exp(0.5 * lv))
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(m, lv), ref)


def test_kl_autoencoder_posterior_sample_and_logvar_clamp():
    ae = AutoencoderKL(1, (8,), 1, latent_channels=2, groups=4)
    moments = torch.cat(
        [torch.full((1, 2, 2, 2), 0.3), torch.tensor([-40.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)], 1
    )
    noise = torch.full((1, 2, 2, 2), 2.0)
    z = ae.latent(moments, noise)
    # channel 0: log σ² clamped to −30 → σ = e^−15; channel 1: σ = e^0.5
    torch.testing.assert_close(z[0, 0], torch.full((2, 2), 0.3 + 2 * math.exp(-15)))
    torch.testing.assert_close(z[0, 1], torch.full((2, 2), 0.3 + 2 * math.exp(0.5)))
    torch.testing.assert_close(ae.latent(moments), torch.full((1, 2, 2, 2), 0.3))
    hand = 4 * 0.5 * (0.09 + math.exp(-30) - 1 + 30) + 4 * 0.5 * (0.09 + math.e - 1 - 1)
    assert ae.kl(moments).item() == pytest.approx(hand, rel=1e-6)


def test_autoencoder_shapes_and_downsampling_factor():
    ae = AutoencoderKL(3, (8, 16, 16), 1, latent_channels=4, groups=4)
    assert ae.factor == 4 and ae.latent_shape((3, 16, 12)) == (4, 4, 3)
    out = ae(torch.randn(2, 3, 16, 12), torch.randn(2, 4, 4, 3))
    assert out.reconstruction.shape == (2, 3, 16, 12) and out.moments.shape == (2, 8, 4, 3)
    with pytest.raises(ValueError, match="not divisible"):
        ae.latent_shape((3, 10, 12))


def test_scaling_factor_is_one_over_the_std_of_the_recorded_latents():
    ae = AutoencoderKL(1, (8,), 1, 2, 4)
    assert ae.scaling_factor == 1.0
    z = torch.randn(4000, dtype=torch.float64) * 3 + 1
    ae.record_latents(z, decay=0.0)  # decay 0: exactly this batch
    assert ae.scaling_factor == pytest.approx(1 / z.std(correction=0).item(), rel=1e-5)
    a, b = torch.full((10,), 2.0), torch.full((10,), -2.0)
    ae2 = AutoencoderKL(1, (8,), 1, 2, 4)
    ae2.record_latents(a, 0.5)
    ae2.record_latents(b, 0.5)
    # weights 0.25 (a) and 0.5 (b) over total 0.75: mean = (0.5 − 1)/0.75, E z² = 4 → var = 4 − (2/3)²
    assert ae2.scaling_factor == pytest.approx((4 - (1 / 3) ** 2) ** -0.5, rel=1e-5)


def test_vq_nearest_code_straight_through_and_commitment():
    vq = VectorQuantizer(3, 2)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]]))
    vq.initialised.fill_(True)
    vq.eval()
    z = torch.tensor([[0.9, 0.8], [-1.5, 0.2], [0.1, -0.1], [0.6, 0.6]]).T.reshape(1, 2, 2, 2).requires_grad_(True)
    q = vq(z)
    assert q.codes.flatten().tolist() == [1, 2, 0, 1]
    expect = torch.tensor([[1.0, 1.0], [-2.0, 0.0], [0.0, 0.0], [1.0, 1.0]]).T.reshape(1, 2, 2, 2)
    torch.testing.assert_close(q.quantized, expect)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    e = expect.permute(0, 2, 3, 1).reshape(-1, 2)
    assert q.commitment.item() == pytest.approx((flat - e).square().mean().item(), rel=1e-6)
    w = torch.randn(1, 2, 2, 2)
    (grad,) = torch.autograd.grad((q.quantized * w).sum(), z)
    torch.testing.assert_close(grad, w)  # straight through: ∂z_q/∂z = I
    # the commitment loss pulls z towards its code: ∂/∂z mean(z − e)² = 2(z − e)/N
    (g2,) = torch.autograd.grad(vq(z).commitment, z)
    torch.testing.assert_close(g2.permute(0, 2, 3, 1).reshape(-1, 2), 2 * (flat - e) / 8)
    # perplexity of codes [1, 2, 0, 1]: p = (1/4, 1/2, 1/4) → exp(H) = exp(1.5 log 2)
    assert q.perplexity.item() == pytest.approx(math.exp(1.5 * math.log(2)), rel=1e-9)
    assert perplexity(torch.zeros(5, dtype=torch.long), 4).item() == pytest.approx(1.0)


def test_vq_ema_codebook_update_matches_hand_computation():
    K, D, gamma, eps = 3, 2, 0.9, 1e-5
    vq = VectorQuantizer(K, D, decay=gamma, eps=eps, dead_threshold=0.0)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]]))
    vq.cluster_size.copy_(torch.tensor([2.0, 1.0, 0.5]))
    vq.embed_sum.copy_(torch.tensor([[0.2, 0.0], [1.0, 1.2], [-1.0, 0.1]]))
    vq.initialised.fill_(True)
    flat = torch.tensor([[0.9, 0.8], [1.1, 1.0], [0.1, -0.1]])
    vq.ema_update(flat, torch.tensor([1, 1, 0]))
    n = torch.tensor([1.0, 2.0, 0.0])
    N = gamma * torch.tensor([2.0, 1.0, 0.5]) + (1 - gamma) * n
    m = gamma * torch.tensor([[0.2, 0.0], [1.0, 1.2], [-1.0, 0.1]]) + (1 - gamma) * torch.tensor(
        [[0.1, -0.1], [2.0, 1.8], [0.0, 0.0]]
    )
    smoothed = (N + eps) / (N.sum() + K * eps) * N.sum()
    torch.testing.assert_close(vq.cluster_size, N)
    torch.testing.assert_close(vq.embed_sum, m)
    torch.testing.assert_close(vq.codebook, m / smoothed[:, None])


def test_vq_dead_code_restart_and_first_batch_initialisation():
    vq = VectorQuantizer(4, 2, decay=0.5, dead_threshold=0.3)
    z = torch.tensor([[5.0, 5.0], [5.1, 5.0], [4.9, 5.0], [5.0, 5.1]]).T.reshape(1, 2, 2, 2)
    g = torch.Generator().manual_seed(0)
    vq.train()
    vq(z, g)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    # every code starts on a latent of the first batch (randn codes would sit ~5 away from these data)
    assert bool(vq.initialised)
    assert (vq.codebook - 5).abs().max() < 0.2
    vq.cluster_size.copy_(torch.tensor([1.0, 0.1, 1.0, 1.0]))
    vq.codebook[1] = torch.tensor([100.0, 100.0])
    vq._restart(flat, vq.cluster_size < 0.3, torch.Generator().manual_seed(1))
    assert (flat - vq.codebook[1]).norm(dim=1).min() < 1e-6  # restarted onto a latent of the batch
    assert vq.cluster_size[1].item() == 1.0
    with pytest.raises(ValueError, match="codebook_size = 0"):
        VectorQuantizer(0, 2)


def test_vq_autoencoder_eval_pass_leaves_codebook_alone():
    ae = VQAutoencoder(1, (8,), 1, latent_channels=2, groups=4, codebook_size=8)
    ae.train()
    x = torch.randn(2, 1, 4, 4)
    ae(x, torch.Generator().manual_seed(0))
    before = ae.quantizer.codebook.clone()
    ae(x, update=False)
    ae.decode(ae.moments(x))
    torch.testing.assert_close(ae.quantizer.codebook, before, rtol=0, atol=0)


def test_gan_losses_against_hand_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: ½[mean relu(1 − real) + mean relu(1 + fake)] = ½[(0 + 0.5)/2 + (0 + 1.5)/2]
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    ns = (sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.5)) / 2
    assert discriminator_loss("non_saturating", real, fake).item() == pytest.approx(ns, rel=1e-6)
    assert discriminator_loss("wgan_gp", real, fake).item() == pytest.approx(-0.75 - 1.25)
    assert generator_loss("non_saturating", fake).item() == pytest.approx((sp(2.0) + sp(-0.5)) / 2, rel=1e-6)
    assert generator_loss("hinge", fake).item() == pytest.approx(0.75)
    assert generator_loss("wgan_gp", fake).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown GAN loss"):
        discriminator_loss("lsgan", real, fake)


def test_gradient_penalty_matches_direct_computation():
    torch.manual_seed(0)
    w = torch.randn(6)
    linear = lambda x: x.flatten(1) @ w  # noqa: E731  ∇D = w everywhere: GP = (‖w‖ − 1)²
    real, fake = torch.randn(3, 1, 2, 3), torch.randn(3, 1, 2, 3)
    gp = gradient_penalty(linear, real, fake, torch.rand(3))
    assert gp.item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-6)
    quad = lambda x: x.flatten(1).square().sum(1)  # noqa: E731  ∇D(x̂) = 2x̂
    eps = torch.tensor([0.2, 0.5, 1.0])
    mixed = eps.view(-1, 1, 1, 1) * real + (1 - eps.view(-1, 1, 1, 1)) * fake
    direct = ((2 * mixed).flatten(1).norm(dim=1) - 1).square().mean()
    torch.testing.assert_close(gradient_penalty(quad, real, fake, eps), direct)
    # differentiable w.r.t. the critic (create_graph): the penalty trains D
    net = nn.Linear(6, 1)
    gp = gradient_penalty(lambda x: net(x.flatten(1)).squeeze(1), real, fake, eps)
    (g,) = torch.autograd.grad(gp, net.weight)
    wn = net.weight.detach().norm()
    torch.testing.assert_close(g, 2 * (wn - 1) * net.weight.detach() / wn)


def test_adaptive_weight_against_autograd_of_the_two_losses():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    y = layer(x)
    rec, gan = (y - 1).abs().mean(), -(y * torch.randn(5, 3)).mean()
    lam = adaptive_weight(rec, gan, layer.weight, delta=1e-4)
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight, retain_graph=True)[0]
    assert lam.item() == pytest.approx((g_rec.norm() / (g_gan.norm() + 1e-4)).item(), rel=1e-6)
    assert not lam.requires_grad
    assert adaptive_weight(rec, 0 * gan, layer.weight, cap=7.0).item() == 7.0  # no GAN gradient: capped


class _Features(nn.Module):
    """A fixed 'network' with known activations: the images themselves and their square."""

    def feature_maps(self, x):
        return [x, x.square() + 1]


def test_perceptual_distance_matches_hand_computation():
    loss = PerceptualLoss(_Features())
    x, y = torch.rand(2, 3, 2, 2) * 2 - 1, torch.rand(2, 3, 2, 2) * 2 - 1
    expect = 0
    for f in (lambda v: v, lambda v: v.square() + 1):
        a, b = f((x + 1) / 2), f((y + 1) / 2)
        a = a / (a.square().sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.square().sum(1, keepdim=True).sqrt() + 1e-10)
        expect = expect + (a - b).square().sum(1).mean((1, 2))
    torch.testing.assert_close(loss(x, y), expect)
    assert loss(x, x).abs().max() < 1e-12


def test_psnr_gaussian_likelihood_and_dequantisation():
    x = torch.zeros(1, 1, 2, 2)
    assert psnr(x, x + 0.1).item() == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-5)
    lik = GaussianLikelihood()
    with torch.no_grad():
        lik.log_scale.fill_(math.log(0.5))
    v = lik(torch.tensor([1.0]), torch.tensor([0.0]))
    ref = -torch.distributions.Normal(0.0, 0.5).log_prob(torch.tensor(1.0))
    torch.testing.assert_close(v, ref.reshape(1))
    k = torch.tensor([0.0, 1.0, 255.0])
    xq = 2 * k / 255 - 1
    u = torch.tensor([0.25, 0.5, 0.999])
    torch.testing.assert_close(dequantize_batch(xq, u), 2 * (k + u) / 255 - 1)
