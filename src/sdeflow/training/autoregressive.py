"""The autoregressive models as objectives on the same loop: exact maximum likelihood, p(x) = ∏_i p(x_i | x_<i).

- ``made``: binarised images (a fresh Bernoulli draw of each pixel's intensity every batch, "dynamic
  binarisation"; evaluation uses one fixed draw), loss −log p(x)/D in nats, reported per image as the papers do.
- ``pixelcnn``: 8-bit images, loss bits/dim = −log₂ P(x)/D of the discrete values (no dequantisation needed:
  the discretized logistic mixture is a distribution over the 256 levels).
- ``vq_transformer``: VQGAN's second stage; the codes of a frozen VQ autoencoder, cross-entropy per code, optional
  class conditioning with label dropout for classifier-free guidance on the logits.

Each exposes ``generate`` (images for figures and FID) and ``evaluate`` (exact likelihood of held-out images), the
hooks ``sdeflow eval`` and ``sdeflow nll`` use for every non-diffusion family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError
from ..config import ConfigError, ExperimentConfig
from ..models.autoencoder import VQAutoencoder
from ..models.autoregressive import MADE, PixelCNN
from ..models.vq_transformer import VQTransformer
from ..sampling.tokens import sample_codes
from .baselines import _ema
from .objective import Objective
from .stream import Batch

__all__ = ["AutoregressiveObjective", "check_vocabulary", "quantize_8bit"]


def quantize_8bit(x: Tensor) -> Tensor:
    """x ∈ [−1, 1] snapped to the 256 levels k/127.5 − 1."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def check_vocabulary(ae: VQAutoencoder, prior: VQTransformer, where: str) -> None:
    """A prior can only read the codes of an autoencoder whose codebook size is its vocabulary size."""
    if ae.codebook_size != prior.vocab_size:
        raise CheckpointError(
            f"{where}: the VQ autoencoder has {ae.codebook_size} codes but the Transformer's vocabulary has "
            f"{prior.vocab_size}: point autoregressive.autoencoder to the autoencoder the prior was trained on"
        )


def _load_vq(path: str, device: torch.device | str = "cpu") -> VQAutoencoder:
    from ..builders import load_autoencoder

    ae = load_autoencoder(path, device=device)
    if not isinstance(ae, VQAutoencoder):
        raise ConfigError(
            f"autoregressive.autoencoder {path} is a KL autoencoder: the VQ-Transformer models the codes of a VQ "
            "autoencoder (autoencoder.kind 'vq')"
        )
    return ae


class AutoregressiveObjective(Objective):
    """Maximum likelihood of a MADE, a PixelCNN or a VQ-Transformer (``autoregressive.model``)."""

    name = "autoregressive"

    def __init__(self, cfg: ExperimentConfig, data_shape: tuple[int, ...]):
        super().__init__()
        r = self.r = cfg.autoregressive
        self.data_shape, self.num_classes = tuple(data_shape), cfg.model.num_classes
        if len(self.data_shape) != 3:
            raise ConfigError(f"autoregressive.model '{r.model}' needs image data (C, H, W), got {self.data_shape}")
        self.dims = math.prod(self.data_shape)
        self.autoencoder: VQAutoencoder | None = None
        # the loss: −log p per pixel (made, nats), bits/dim (pixelcnn, already per pixel), per code (vq_transformer)
        self.per_unit = self.dims if r.model == "made" else 1
        if r.model == "made":
            self.net: nn.Module = MADE(self.dims, tuple(r.hidden), r.num_orders, cfg.seed)
        elif r.model == "pixelcnn":
            if self.data_shape[0] != 1:
                raise ConfigError(f"autoregressive.model 'pixelcnn' models one-channel images, data has {data_shape}")
            self.net = PixelCNN(r.channels, r.blocks, r.mixtures)
        else:
            ae = _load_vq(r.autoencoder)  # type: ignore[arg-type]
            _c, h, w = ae.latent_shape(self.data_shape)
            self.net = VQTransformer(ae.codebook_size, h * w, self.num_classes, r.width, r.depth, r.heads,
                                     dropout=r.dropout)  # fmt: skip
            object.__setattr__(self, "autoencoder", ae)  # frozen, not saved with the prior
            self.code_shape, self.per_unit = (h, w), h * w

        self.ema = _ema(cfg, self.net)
        self.distribute(lambda m: m)

    def _apply(self, fn, recurse=True):  # .to(device) moves the frozen autoencoder too
        if self.autoencoder is not None:
            self.autoencoder._apply(fn)
        return super()._apply(fn, recurse)

    def parameters_for(self, phase: str) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        object.__setattr__(self, "run_net", wrap(self.net))

    def after_step(self, step: int) -> None:
        if self.r.model == "made":
            self.net.next_order()  # type: ignore[operator]
        if self.ema is not None:
            self.ema.update(self.net, step)

    def saved_modules(self) -> tuple[nn.Module, nn.Module | None]:
        return self.net, (self.ema.model if self.ema is not None else None)

    def meta(self) -> dict[str, Any]:
        if self.autoencoder is None:
            return {}
        return {"autoencoder": self.r.autoencoder, "autoencoder_fingerprint": self.autoencoder.fingerprint(),
                "vocab_size": self.net.vocab_size}  # type: ignore[dict-item]  # fmt: skip

    def check_trained(self, meta: dict[str, Any], where: str) -> None:
        """Refuse a checkpoint whose prior was trained on another codebook than the autoencoder found now."""
        if self.autoencoder is not None and "vocab_size" in meta and meta["vocab_size"] != self.net.vocab_size:
            raise CheckpointError(
                f"{where}: the Transformer was trained on {meta['vocab_size']} codes but the VQ autoencoder at "
                f"{self.r.autoencoder} has {self.autoencoder.codebook_size}: point autoregressive.autoencoder to the "
                "autoencoder the prior was trained on"
            )

    def negative_log_likelihood(self, net: Callable, x: Tensor, labels: Tensor | None, binary: Tensor | None) -> Tensor:
        """−log p per image: nats (made: of ``binary``; vq_transformer: of the codes) or bits/dim (pixelcnn)."""
        if self.r.model == "made":
            return -MADE.log_prob_of(net(binary), binary)
        if self.r.model == "pixelcnn":
            return -PixelCNN.log_prob_of(net(quantize_8bit(x)), quantize_8bit(x)) / (self.dims * math.log(2))
        with torch.no_grad():
            codes = self.autoencoder.codes(x).flatten(1)  # type: ignore[union-attr]
        return -VQTransformer.log_prob_of(net(codes[:, :-1], labels), codes)

    def loss(self, batch: Batch, phase: str) -> Tensor:
        binary = None
        if self.r.model == "made":  # dynamic binarisation
            binary = (batch.rand(*self.data_shape) < (batch.x.float() + 1) / 2).to(batch.x.dtype)
        nll = self.negative_log_likelihood(self.run_net, batch.x, batch.labels, binary)
        return nll.mean() / self.per_unit  # per pixel or per code: the scale of the loss does not grow with D

    def sampling_net(self) -> nn.Module:
        return (self.ema.model if self.ema is not None else self.net).eval()

    @torch.no_grad()
    def generate(self, n: int, seed: int, progress: bool = False) -> tuple[Tensor, Tensor | None]:
        """n images in [−1, 1] (the EMA network); a class-conditional prior cycles through the classes."""
        net, r = self.sampling_net(), self.r
        device = next(net.parameters()).device
        g = torch.Generator(device).manual_seed(seed)
        labels = torch.arange(n, device=device) % self.num_classes if self.num_classes else None
        if r.model == "made":
            out = net.sample(n, g, progress).view(n, *self.data_shape) * 2 - 1  # type: ignore[operator]
        elif r.model == "pixelcnn":
            out = net.sample(n, self.data_shape[-1], g, progress)  # type: ignore[operator]
        else:
            codes = sample_codes(net, n, labels, r.temperature, r.top_k, r.top_p, r.cfg, g, progress=progress)  # type: ignore[arg-type]
            out = self.autoencoder.decode_codes(codes.view(n, *self.code_shape)).clamp(-1, 1)  # type: ignore[union-attr]
        self.net.train()
        return out, labels

    @torch.no_grad()
    def evaluate(self, x: Tensor, labels: Tensor | None = None, generator: torch.Generator | None = None,
                 batch: int = 500) -> dict[str, Any]:  # fmt: skip
        """Exact likelihood of held-out images ``x``: nats per image (made: of one fixed binarisation drawn from
        ``generator``, averaged over the orderings), bits/dim (pixelcnn), nats per image and bits per code
        (vq_transformer; the likelihood of the codes, not of the pixels)."""
        net, r = self.sampling_net(), self.r
        g = generator or torch.Generator(x.device).manual_seed(0)
        binary = (
            (torch.rand(x.shape, generator=g, device=x.device) < (x + 1) / 2).float() if r.model == "made" else None
        )
        vals = []
        for i in range(0, len(x), batch):
            xb, lb = x[i : i + batch], None if labels is None else labels[i : i + batch]
            bb = None if binary is None else binary[i : i + batch]
            if r.model == "made" and len(net.orders) > 1:  # log (1/K) Σ_k p_k(x)  # type: ignore[arg-type]
                per_order = []
                for _ in net.orders:  # type: ignore[union-attr]
                    net.next_order()  # type: ignore[operator]
                    per_order.append(-self.negative_log_likelihood(net, xb, lb, bb))
                vals.append(-(torch.logsumexp(torch.stack(per_order), 0) - math.log(len(per_order))))
            else:
                vals.append(self.negative_log_likelihood(net, xb, lb, bb))
        v = torch.cat(vals).double()
        self.net.train()
        key = {"made": "nats", "pixelcnn": "bits_per_dim", "vq_transformer": "nats"}[r.model]
        out = {key: float(v.mean()), f"{key}_se": float(v.std() / math.sqrt(len(v))), "n": len(v)}
        if r.model == "vq_transformer":
            out["bits_per_code"] = out["nats"] / (math.prod(self.code_shape) * math.log(2))
        return out
