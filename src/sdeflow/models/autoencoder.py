"""The autoencoders of latent diffusion: the KL autoencoder of LDM / Stable Diffusion (Rombach et al. 2022,
§3 and appendix G) and the VQ autoencoder of VQ-VAE / VQGAN (van den Oord et al. 2017; Esser et al. 2021).

Both share one ResNet encoder and decoder with GroupNorm and a mid-block self-attention, laid out and named as in
diffusers' ``AutoencoderKL`` (``encoder.down_blocks.0.resnets.0.conv1.weight``, …), so Stable Diffusion's VAE
folder loads into :class:`AutoencoderKL` as is (:meth:`AutoencoderKL.from_diffusers`). With ``len(channels) = k``
the image is downsampled by f = 2^(k−1) (LDM's f = 4, 8).

- :class:`AutoencoderKL`: the encoder gives the moments (μ, log σ²) of a diagonal Gaussian posterior q(z|x);
  z = μ + σ·ε; KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²) (Kingma & Welling 2014, appendix B).
- :class:`VQAutoencoder`: the encoder's output is snapped to its nearest codebook vector
  (:class:`~sdeflow.models.quantizer.VectorQuantizer`); latent diffusion runs on the pre-quantisation latent and
  the decoder quantises (LDM's VQ-regularised variant).

Every autoencoder keeps running statistics of its latents (``latent_stats``), so the latent scaling factor
1/std(z) that latent diffusion needs (SD's 0.18215) is estimated from the training data and stored with the
weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import GroupNorm
from .quantizer import VectorQuantizer

__all__ = ["Autoencoder", "AutoencoderKL", "AutoencoderOutput", "VQAutoencoder", "gaussian_kl"]


class AutoencoderOutput(NamedTuple):
    reconstruction: Tensor
    moments: Tensor  # what a latent cache stores: (μ, log σ²) for KL, the pre-quantisation latent for VQ
    latent: Tensor  # z the decoder saw (sampled for KL, quantised for VQ)
    regulariser: Any  # KL per sample (KL) or the quantiser's output (VQ)


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over all but the batch dimension."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1×1 convolution on the skip when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(groups, cin, eps), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = GroupNorm(groups, cout, eps), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x, act=True)), act=True))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """x + W_o·softmax(QKᵀ/√C)V over the H·W positions, one head of width C (LDM's mid-block attention)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        out = F.scaled_dot_product_attention(self.to_q(t)[:, None], self.to_k(t)[:, None], self.to_v(t)[:, None])
        return x + self.to_out[0](out[:, 0]).transpose(1, 2).reshape(b, c, h, w)


class Resample(nn.Module):
    """Halve (asymmetric zero pad, 3×3 stride-2 convolution) or double (nearest, then 3×3) the resolution."""

    def __init__(self, channels: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """A run of ResNet blocks, then an optional down- or up-sampler (diffusers' names kept for loading)."""

    def __init__(self, cin: int, cout: int, blocks: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(blocks))
        if resample is not None:
            setattr(self, f"{resample}samplers", nn.ModuleList([Resample(cout, resample == "down")]))
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.resnets:
            x = block(x)
        return x if self.resample is None else getattr(self, f"{self.resample}samplers")[0](x)


class MidBlock(nn.Module):
    """ResNet block → (attention) → ResNet block at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups) for _ in range(2))
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cin: int, cout: int, channels: tuple[int, ...], blocks: int, groups: int, attention: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, channels[0], 3, padding=1)
        last = len(channels) - 1
        self.down_blocks = nn.ModuleList(
            Stage(channels[max(i - 1, 0)], c, blocks, groups, "down" if i < last else None)
            for i, c in enumerate(channels)
        )
        self.mid_block = MidBlock(channels[-1], groups, attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1], 1e-6)
        self.conv_out = nn.Conv2d(channels[-1], cout, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for stage in self.down_blocks:
            x = stage(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x), act=True))


class Decoder(nn.Module):
    def __init__(self, cin: int, cout: int, channels: tuple[int, ...], blocks: int, groups: int, attention: bool):
        super().__init__()
        rev = channels[::-1]
        self.conv_in = nn.Conv2d(cin, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, attention)
        last = len(rev) - 1
        self.up_blocks = nn.ModuleList(
            Stage(rev[max(i - 1, 0)], c, blocks + 1, groups, "up" if i < last else None) for i, c in enumerate(rev)
        )
        self.conv_norm_out = GroupNorm(groups, rev[-1], 1e-6)
        self.conv_out = nn.Conv2d(rev[-1], cout, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for stage in self.up_blocks:
            x = stage(x)
        return self.conv_out(self.conv_norm_out(x, act=True))


class Autoencoder(nn.Module):
    """What latent diffusion needs of an autoencoder: :meth:`moments` (what a latent cache stores),
    :meth:`latent` (z from the moments and noise), :meth:`decode`, the latent shape and the scaling factor."""

    moment_factor = 1  # moments have moment_factor × latent_channels channels

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, ...] = (64, 128),
        layers_per_block: int = 1,
        latent_channels: int = 4,
        groups: int = 32,
        mid_attention: bool = True,
    ):
        super().__init__()
        channels = tuple(channels)
        if any(c % groups for c in channels):
            raise ValueError(f"every entry of channels {channels} must be divisible by groups ({groups})")
        self.in_channels, self.latent_channels, self.factor = in_channels, latent_channels, 2 ** (len(channels) - 1)
        m = self.moment_factor * latent_channels
        self.encoder = Encoder(in_channels, m, channels, layers_per_block, groups, mid_attention)
        self.decoder = Decoder(latent_channels, in_channels, channels, layers_per_block, groups, mid_attention)
        self.quant_conv = nn.Conv2d(m, m, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        # decayed running (weight, Σz, Σz²) of the training latents: the scaling factor 1/std(z)
        self.register_buffer("latent_stats", torch.tensor([0.0, 0.0, 1.0]))

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, int, int]:
        _, h, w = image_shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}×{w} is not divisible by the downsampling factor {self.factor}")
        return self.latent_channels, h // self.factor, w // self.factor

    def moments(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(x))

    def latent(self, moments: Tensor, noise: Tensor | None = None) -> Tensor:
        return moments

    def decode(self, z: Tensor) -> Tensor:
        """Images from latents (a VQ autoencoder snaps them to its codes first)."""
        return self.decode_quantized(z)

    def decode_quantized(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the weights and statistics: tells one autoencoder from another."""
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def scaling_factor(self) -> float:
        """1/std of the latents over the training data seen (1 before any statistics are recorded)."""
        w, s1, s2 = self.latent_stats.double().tolist()
        if w <= 0:
            return 1.0
        return float((s2 / w - (s1 / w) ** 2) ** -0.5)

    @torch.no_grad()
    def record_latents(self, z: Tensor, decay: float = 0.99) -> None:
        """Fold a batch of latents into the decayed running moments behind :attr:`scaling_factor`."""
        z = z.detach().double()
        new = torch.stack([torch.ones((), dtype=z.dtype, device=z.device), z.mean(), z.square().mean()])
        self.latent_stats.copy_((decay * self.latent_stats.double() + (1 - decay) * new).to(self.latent_stats))


class AutoencoderKL(Autoencoder):
    """The KL-regularised autoencoder: moments (μ, log σ²) with log σ² clamped to [−30, 20] as in LDM."""

    moment_factor = 2

    @staticmethod
    def split(moments: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def latent(self, moments: Tensor, noise: Tensor | None = None) -> Tensor:
        """z = μ + σ·ε (the posterior mean when ``noise`` is None)."""
        mean, logvar = self.split(moments)
        return mean if noise is None else mean + torch.exp(0.5 * logvar) * noise

    def kl(self, moments: Tensor) -> Tensor:
        return gaussian_kl(*self.split(moments))

    def forward(self, x: Tensor, noise: Tensor | None = None) -> AutoencoderOutput:
        moments = self.moments(x)
        z = self.latent(moments, noise)
        return AutoencoderOutput(self.decode_quantized(z), moments, z, self.kl(moments))

    @classmethod
    def from_diffusers(cls, folder: str | Path) -> AutoencoderKL:
        """Read a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
        as ``save_pretrained`` writes it) without importing diffusers; its ``scaling_factor`` becomes ours."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path, weights = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
        for p in (cfg_path, weights):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found: not a diffusers AutoencoderKL folder")
        cfg = json.loads(cfg_path.read_text())
        blocks = cfg.get("block_out_channels", [64])
        if cfg.get("in_channels", 3) != cfg.get("out_channels", 3) or not cfg.get("use_quant_conv", True):
            raise ValueError(f"{cfg_path}: only in_channels = out_channels and quant convolutions are supported")
        ae = cls(
            cfg.get("in_channels", 3),
            tuple(blocks),
            cfg.get("layers_per_block", 1),
            cfg.get("latent_channels", 4),
            cfg.get("norm_num_groups", 32),
            cfg.get("mid_block_add_attention", True),
        )
        sd = load_file(weights)
        sf = float(cfg.get("scaling_factor", 0.18215))
        sd["latent_stats"] = torch.tensor([1.0, 0.0, sf**-2])
        try:
            ae.load_state_dict(sd)
        except RuntimeError as e:  # missing, unexpected or mis-shaped keys
            raise ValueError(f"{weights} does not fit the AutoencoderKL its config.json describes: {e}") from None
        return ae


class VQAutoencoder(Autoencoder):
    """The vector-quantised autoencoder: the encoder's latent is snapped to the nearest of ``codebook_size``
    codes before decoding (VQ-VAE; VQGAN adds the perceptual and adversarial losses in the objective)."""

    def __init__(self, *args, codebook_size: int = 512, decay: float = 0.99, cosine: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.quantizer = VectorQuantizer(codebook_size, self.latent_channels, decay, cosine=cosine)

    def decode(self, z: Tensor) -> Tensor:
        return self.decode_quantized(self.quantizer(z, update=False).quantized)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.num_codes

    def codes(self, x: Tensor) -> Tensor:
        """The (B, H, W) code indices of images x: what VQGAN's second stage models (Esser et al. 2021, §3.2)."""
        return self.quantizer(self.moments(x), update=False).codes

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Images from (B, H, W) code indices."""
        return self.decode_quantized(self.quantizer.embed(codes).to(self.post_quant_conv.weight.dtype))

    def forward(self, x: Tensor, generator: torch.Generator | None = None, update: bool = True) -> AutoencoderOutput:
        """``update``: let a training-mode pass move the EMA codebook (off for the discriminator's pass)."""
        moments = self.moments(x)
        q = self.quantizer(moments, generator, update=update)
        return AutoencoderOutput(self.decode_quantized(q.quantized), moments, moments, q)
