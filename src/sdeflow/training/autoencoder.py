"""The autoencoder objective: KL autoencoder, VQ autoencoder / VQGAN, and the plain VAE, as loss parts chosen by
the config (Rombach et al. 2022, appendix G; Esser et al. 2021, eq. 4–7; Kingma & Welling 2014).

Phase "model" (the autoencoder), per sample x with reconstruction x̂ and D = dim x:

    L = L_rec(x, x̂) + w_p·d_perc(x, x̂) + w_KL·KL(q(z|x) ‖ N(0, I)) / D   (KL)   or   + β‖z − sg(e)‖²   (VQ)
        + w_GAN·λ·L_G(D(x̂))   from ``disc_start`` on, λ the adaptive weight (VQGAN eq. 7),

with L_rec the mean |x − x̂| (l1), (x − x̂)² (l2), or, for the VAE, −log N(x̃; x̂, σ²) per dimension of the
dequantised x̃ with a learned σ, so that with w_KL = 1 the loss is the negative ELBO in nats per dimension.
Phase "disc" (the PatchGAN discriminator, when w_GAN > 0): L_D(D(x), D(sg(x̂))) (+ λ_GP·GP for WGAN-GP).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..builders import build_autoencoder
from ..config import ConfigError, ExperimentConfig
from ..models.autoencoder import AutoencoderKL, VQAutoencoder
from ..models.gan import PatchDiscriminator
from ..sampling.likelihood import bits_per_dim
from .adversarial import PerceptualLoss, adaptive_weight, discriminator_loss, generator_loss, gradient_penalty
from .ema import EMA
from .objective import Objective
from .stream import Batch

__all__ = ["AutoencoderObjective", "GaussianLikelihood", "psnr"]


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio of images in [−1, 1] (peak-to-peak 2): 10 log₁₀(2² / MSE), per sample."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(4 / mse)


class GaussianLikelihood(nn.Module):
    """−log N(x; μ, σ²) per dimension, σ = e^s with one learned s (the VAE decoder's noise level)."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, mean: Tensor) -> Tensor:
        s = self.log_scale
        return 0.5 * ((x - mean) * torch.exp(-s)).square() + s + 0.5 * math.log(2 * math.pi)


def dequantize_batch(x: Tensor, noise: Tensor, levels: int = 256) -> Tensor:
    """x̃ = 2(k + u)/(L − 1) − 1 for x = 2k/(L − 1) − 1, u ~ U[0, 1) (as :func:`~sdeflow.sampling.likelihood.
    dequantize`, with the batch's own noise so that resume repeats it)."""
    k = torch.round((x + 1) * (levels - 1) / 2)
    return 2 * (k + noise.to(x.dtype)) / (levels - 1) - 1


class AutoencoderObjective(Objective):
    """KL / VQ autoencoder with the configured reconstruction, perceptual, regulariser and adversarial parts."""

    name = "autoencoder"

    def __init__(self, cfg: ExperimentConfig, data_shape: tuple[int, ...], perceptual: nn.Module | None = None):
        super().__init__()
        a = self.a = cfg.autoencoder
        self.cfg, self.data_shape = cfg, tuple(data_shape)
        nets: dict[str, nn.Module] = {"autoencoder": build_autoencoder(a, self.data_shape)}
        if a.reconstruction == "gaussian":
            nets["likelihood"] = GaussianLikelihood()
        if a.disc_weight > 0:
            disc = PatchDiscriminator(self.data_shape[0], a.disc_width, a.disc_layers, a.disc_norm)
            if disc.output_size(min(self.data_shape[1:])) < 1:
                raise ConfigError(
                    f"autoencoder.disc_layers = {a.disc_layers} downsamples {self.data_shape[1]}×{self.data_shape[2]} "
                    "images below one patch; use fewer layers"
                )
            nets["discriminator"] = disc
        self.nets = nn.ModuleDict(nets)
        self.phases = ("model", "disc") if a.disc_weight > 0 else ("model",)
        if perceptual is None and a.perceptual_weight > 0:
            from ..evaluation.inception import load_fid_inception

            try:
                net = load_fid_inception(a.perceptual_weights)
            except FileNotFoundError as e:
                raise ConfigError(f"autoencoder.perceptual_weights: {e}") from None
            perceptual = PerceptualLoss(net, size=a.perceptual_resolution)
        self.perceptual = perceptual
        e = cfg.train.ema
        self.ema = EMA(self.autoencoder, e.kind, e.decay, e.std, e.start_step) if e.kind != "none" else None
        self.distribute(lambda m: m)

    @property
    def autoencoder(self) -> AutoencoderKL | VQAutoencoder:
        return self.nets["autoencoder"]  # type: ignore[return-value]

    def parameters_for(self, phase: str) -> list[nn.Parameter]:
        if phase == "disc":
            return list(self.nets["discriminator"].parameters())
        return [p for k, m in self.nets.items() if k != "discriminator" for p in m.parameters()]

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        object.__setattr__(self, "run_autoencoder", wrap(self.autoencoder))
        if "discriminator" in self.nets:
            object.__setattr__(self, "run_discriminator", wrap(self.nets["discriminator"]))

    def forward_autoencoder(self, batch: Batch, update: bool = True):
        """The autoencoder's pass on ``batch`` with the batch's own posterior noise (KL) or generator (VQ)."""
        ae = self.autoencoder
        if isinstance(ae, VQAutoencoder):
            return self.run_autoencoder(batch.x, batch.generator, update)
        return self.run_autoencoder(batch.x, batch.randn(*ae.latent_shape(self.data_shape)).to(batch.x.dtype))

    def reconstruction_loss(self, x: Tensor, recon: Tensor, batch: Batch) -> Tensor:
        a = self.a
        if a.reconstruction == "gaussian":
            target = dequantize_batch(x, batch.rand(*x.shape[1:]))
            return self.nets["likelihood"](target.float(), recon.float()).mean()
        diff = (x - recon).float()
        rec = diff.abs().mean() if a.reconstruction == "l1" else diff.square().mean()
        if self.perceptual is not None:
            rec = rec + a.perceptual_weight * self.perceptual(x, recon).mean()
        return rec

    def loss(self, batch: Batch, phase: str) -> Tensor:
        a, x = self.a, batch.x
        if phase == "disc":
            with torch.no_grad():
                fake = self.forward_autoencoder(batch, update=False).reconstruction
            loss = discriminator_loss(a.disc_loss, self.run_discriminator(x), self.run_discriminator(fake))
            if a.disc_loss == "wgan_gp":
                loss = loss + a.gp_weight * gradient_penalty(self.run_discriminator, x, fake, batch.rand())
            return loss if batch.step >= a.disc_start else 0 * loss  # the discriminator waits for its start
        out = self.forward_autoencoder(batch)
        self.autoencoder.record_latents(out.moments if isinstance(self.autoencoder, VQAutoencoder) else out.latent)
        rec = self.reconstruction_loss(x, out.reconstruction, batch)
        if isinstance(self.autoencoder, VQAutoencoder):
            loss = rec + a.commitment_weight * out.regulariser.commitment
        else:
            loss = rec + a.kl_weight * out.regulariser.mean() / math.prod(self.data_shape)
        if a.disc_weight > 0 and batch.step >= a.disc_start:
            g = generator_loss(a.disc_loss, self.run_discriminator(out.reconstruction))
            lam = adaptive_weight(rec, g, self.autoencoder.decoder.conv_out.weight)
            loss = loss + a.disc_weight * lam * g
        return loss

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.autoencoder, step)

    def saved_modules(self) -> tuple[nn.Module, nn.Module | None]:
        return self.nets, (self.ema.model if self.ema is not None else None)

    def sampling_autoencoder(self) -> AutoencoderKL | VQAutoencoder:
        return (self.ema.model if self.ema is not None else self.autoencoder).eval()  # type: ignore[return-value]

    @torch.no_grad()
    def generate(self, n: int, seed: int) -> tuple[Tensor, Tensor | None] | None:
        """The VAE samples its prior: x = decoder(z), z ~ N(0, I); the other autoencoders draw nothing."""
        if self.a.reconstruction != "gaussian":
            return None
        ae = self.sampling_autoencoder()
        p = next(ae.parameters())
        g = torch.Generator(p.device).manual_seed(seed)
        z = torch.randn((n, *ae.latent_shape(self.data_shape)), generator=g, device=p.device)
        out = ae.decode(z).clamp(-1, 1)
        self.autoencoder.train()
        return out, None

    @torch.no_grad()
    def evaluate(
        self, x: Tensor, labels: Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """PSNR of reconstructions (posterior means), codebook use, scaling factor; the VAE's ELBO in bits/dim."""
        ae = self.sampling_autoencoder()
        m = ae.moments(x)
        z = ae.latent(m)
        recon = ae.decode(z)
        out: dict[str, Any] = {"psnr": float(psnr(x, recon).mean()), "scaling_factor": ae.scaling_factor}
        if isinstance(ae, VQAutoencoder):
            q = ae.quantizer(m, update=False)
            out.update(perplexity=float(q.perplexity), codes_used=int(q.codes.unique().numel()),
                       codebook_size=ae.quantizer.num_codes)  # fmt: skip
        if self.a.reconstruction == "gaussian":
            out["elbo_bits_per_dim"] = float(self.elbo_bits_per_dim(x, generator).mean())
        self.autoencoder.train()
        return out

    @torch.no_grad()
    def elbo_bits_per_dim(self, x: Tensor, generator: torch.Generator | None = None, levels: int = 256) -> Tensor:
        """−ELBO of uniformly dequantised x in bits per dimension (one posterior sample): an upper bound."""
        ae = self.sampling_autoencoder()
        g = generator or torch.Generator(x.device).manual_seed(0)
        target = dequantize_batch(x, torch.rand(x.shape, generator=g, device=x.device), levels)
        m = ae.moments(target)
        eps = torch.randn(m[:, : ae.latent_channels].shape, generator=g, device=x.device)
        recon = ae.decode(ae.latent(m, eps))
        nll = self.nets["likelihood"](target, recon).flatten(1).sum(1) + ae.kl(m)
        return bits_per_dim(-nll, math.prod(self.data_shape), levels)

    def report(self, out: Path, x: Tensor) -> dict[str, Any]:
        """Reconstruction grid (and the codebook-usage plot of a VQ autoencoder) in the run folder."""
        from .run_log import save_codebook_plot, save_reconstructions

        ae = self.sampling_autoencoder()
        with torch.no_grad():
            recon = ae.decode(ae.latent(ae.moments(x))).clamp(-1, 1)
        self.autoencoder.train()
        save_reconstructions(x, recon, out / "reconstructions.png")
        if isinstance(ae, VQAutoencoder):
            save_codebook_plot(ae.quantizer.cluster_size, out / "codebook_usage.png")
        return self.evaluate(x)
