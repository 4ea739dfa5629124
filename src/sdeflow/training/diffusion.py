"""Denoising score matching as an objective: L = E_σ E_{x0,ε} [λ(σ) ‖D(x0 + σε; σ) − x0‖²]
(Karras et al. 2022, eq. 2 and 8) with the recipe's σ-distribution and weighting; in latent diffusion x0 = c·z with
z ~ q(z|x) of a frozen autoencoder and c its scaling factor (Rombach et al. 2022, §3.3 and appendix G). A
text-conditioned model reads each caption through a frozen text encoder, encoded once per caption; dropped
captions (``train.label_dropout``) become the empty prompt, which classifier-free guidance uses as ∅."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..builders import (
    build_denoiser,
    build_network,
    build_recipe,
    controlled,
    load_text_encoder,
    lora_spec,
    resolve_base,
)
from ..checkpoint import check_finite, load_weights
from ..config import ConfigError, ExperimentConfig
from ..core.condition import ControlCondition
from ..core.losses import Recipe, denoising_loss
from ..core.preconditioning import Denoiser
from ..data.control import control_map
from ..models.autoencoder import Autoencoder, AutoencoderKL
from ..models.lora import add_lora, architecture_fingerprint, save_lora
from ..models.text_encoder import CaptionTable, TextEncoder
from ..sampling import sample
from .ema import EMA
from .objective import Objective
from .stream import Batch

__all__ = ["DiffusionObjective"]


class DiffusionObjective(Objective):
    """One network trained by denoising score matching, with an optional EMA copy that sampling uses.

    Args:
        net: the backbone, called as ``net(x, c_noise, cond)``.
        recipe: process, parameterization, σ-distribution and weighting.
        cfg: the experiment (its ``diffusion``, ``train.ema`` and ``sample`` sections).
        data_shape: the shape the network sees (the latent shape in latent diffusion).
        autoencoder: latent diffusion's frozen autoencoder; batches hold images, or their posterior moments when
            ``cached`` (see :mod:`~sdeflow.training.latents`).
        text_encoder, captions: text-to-image: the frozen encoder and the dataset's caption table, which batch
            labels index (-1: the empty prompt).
    """

    name = "diffusion"
    phases = ("model",)

    def __init__(
        self,
        net: nn.Module,
        recipe: Recipe,
        cfg: ExperimentConfig,
        data_shape: tuple[int, ...],
        autoencoder: Autoencoder | None = None,
        cached: bool = False,
        text_encoder: TextEncoder | None = None,
        captions: list[str] | None = None,
    ):
        super().__init__()
        self.net, self.recipe, self.cfg, self.data_shape = net, recipe, cfg, tuple(data_shape)
        self.autoencoder, self.cached = autoencoder, cached
        if autoencoder is not None:  # frozen: its fingerprint and scaling factor are fixed for the run
            autoencoder.eval().requires_grad_(False)
            self._ae_meta = {"autoencoder_fingerprint": autoencoder.fingerprint(),
                             "latent_scale": autoencoder.scaling_factor}  # fmt: skip
        self.captions = CaptionTable(text_encoder, captions or []) if text_encoder is not None else None
        self._text_meta = {}
        if text_encoder is not None:  # which encoder reads the prompts: sampling must use the same one
            enc = text_encoder
            self._text_meta = {"text_encoder": cfg.text.encoder, "text_fingerprint": enc.fingerprint(),
                               "text_width": enc.width, "text_pooled_width": enc.pooled_width}  # fmt: skip
        e = cfg.train.ema
        self.ema = EMA(net, e.kind, e.decay, e.std, e.start_step) if e.kind != "none" else None
        self.distribute(lambda m: m)

    @classmethod
    def from_config(
        cls, cfg: ExperimentConfig, data_shape: tuple[int, ...], autoencoder: Autoencoder | None = None,
        cached: bool = False, captions: list[str] | None = None,
    ) -> DiffusionObjective:  # fmt: skip
        encoder = None
        if cfg.text.encoder:
            if not captions:
                raise ConfigError(f"text.encoder needs a captioned dataset (data.name: shapes), not '{cfg.data.name}'")
            device = (
                cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            )
            encoder = load_text_encoder(cfg.text, device)
        widths = (encoder.width, encoder.pooled_width) if encoder is not None else None
        net = build_network(cfg.model, data_shape, widths)
        obj = cls(net, build_recipe(cfg.diffusion), cfg, data_shape, autoencoder, cached, encoder, captions)
        obj.prior_labels = None
        if cfg.finetune.base:
            obj.start_from_base(data_shape)
        return obj

    def start_from_base(self, data_shape: tuple[int, ...]) -> None:
        """Fine-tuning: the base run's EMA (else raw) weights, then, for LoRA, adapters on the frozen base."""
        cfg, ck = resolve_base(self.cfg)
        assert ck is not None
        if tuple(ck["meta"]["data_shape"]) != tuple(data_shape):
            raise ConfigError(
                f"finetune.base {ck['path']} was trained on data of shape {tuple(ck['meta']['data_shape'])}, this "
                f"run's data '{cfg.data.name}' has shape {tuple(data_shape)}"
            )
        which = "ema" if ck.get("ema") else "model"
        source = f"{ck['path']}/{which}.safetensors"
        check_finite(ck[which], source)
        load_weights(self.net, ck[which], source)
        self._base_meta = {"base": str(ck["path"]), "base_architecture": architecture_fingerprint(self.net)}
        self._base_sha = ck["meta"].get("sha256", {}).get(f"{which}.safetensors")
        if cfg.finetune.prior_weight > 0:
            if cfg.text.encoder:
                raise ConfigError("finetune.prior_weight: prior preservation of a text-to-image base is not supported")
            self.draw_prior()
        spec = lora_spec(cfg)
        if spec is not None:
            try:
                add_lora(self.net, spec)
            except ValueError as e:
                raise ConfigError(f"finetune: {e}") from None
        if cfg.finetune.method == "controlnet":
            self.net = controlled(cfg, self.net.requires_grad_(False))  # the copy trains, the base stays frozen
            self.distribute(lambda m: m)
        if self.ema is not None:  # the average starts at the base (and holds the adapters' layers)
            e = cfg.train.ema
            self.ema = EMA(self.net, e.kind, e.decay, e.std, e.start_step)

    def condition(self, labels: Tensor | None, batch: int, images: Tensor | None = None) -> Any:
        """The network's condition for batch labels: class labels as they are, caption indices encoded; a
        ControlNet run adds the control maps of the batch's ``images``."""
        cond = labels if self.captions is None else self.captions(labels, batch)
        if images is not None and self.cfg.finetune.method == "controlnet":
            return ControlCondition(cond, (control_map(self.cfg.finetune.control, images),))
        return cond

    def clean_data(self, batch: Batch) -> Tensor:
        """x0: the batch's images, or c·z with z = μ + σ·ε from their posterior (ε drawn from the batch)."""
        ae = self.autoencoder
        if ae is None:
            return batch.x
        with torch.no_grad(), torch.autocast(batch.x.device.type, enabled=False):
            moments = batch.x if self.cached else ae.moments(batch.x)
            noise = batch.randn(*self.data_shape).to(moments.dtype) if isinstance(ae, AutoencoderKL) else None
            return ae.latent(moments, noise) * self._ae_meta["latent_scale"]  # a float: no GPU sync per step

    def train(self, mode: bool = True) -> DiffusionObjective:
        super().train(mode)
        if self.autoencoder is not None:  # frozen: always in eval mode
            self.autoencoder.eval()
        return self

    def meta(self) -> dict:
        return {**(self._ae_meta if self.autoencoder is not None else {}), **self._text_meta,
                **getattr(self, "_base_meta", {})}  # fmt: skip

    def parameters_for(self, phase: str) -> list[nn.Parameter]:
        """Every weight of the network; with LoRA only the adapters' (the base is frozen)."""
        return [p for p in self.net.parameters() if p.requires_grad]

    def report(self, out: Path, x: Tensor) -> dict[str, Any]:
        """A LoRA run writes its adapter alone (EMA weights) to ``out/adapter``: safetensors + adapter.json."""
        spec = lora_spec(self.cfg)
        if spec is None:
            return {}
        net = self.ema.model if self.ema is not None else self.net
        folder = save_lora(net, out / "adapter", spec, base_fingerprint=self._base_meta["base_architecture"])
        return {"adapter": str(folder), "adapter_bytes": (folder / "adapter.safetensors").stat().st_size,
                "trainable_parameters": sum(p.numel() for p in self.parameters_for("model"))}  # fmt: skip

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        # a plain attribute, not a submodule: the wrapped forward must not enter state dicts or .to() twice
        object.__setattr__(self, "denoiser", build_denoiser(wrap(self.net), self.recipe, self.cfg.diffusion, False))

    def loss(self, batch: Batch, phase: str) -> Tensor:
        x0 = self.clean_data(batch)
        loss = self.dsm(batch, x0, self.condition(batch.labels, len(x0), batch.x))
        w = self.cfg.finetune.prior_weight
        if w > 0:  # prior preservation: the base's own samples keep being denoised as the base did
            if self._prior.device != x0.device:
                self._prior = self._prior.to(x0.device)
            prior = self._prior
            idx = (batch.rand() * len(prior)).long().clamp_max(len(prior) - 1)
            labels = self.prior_labels[idx.cpu()].to(x0.device) if self.prior_labels is not None else None
            loss = loss + w * self.dsm(batch, prior[idx.to(prior.device)].to(x0.dtype), labels)
        return loss

    def dsm(self, batch: Batch, x0: Tensor, cond: Any) -> Tensor:
        """The mean weighted denoising loss of x0 at σ and noise drawn from the batch's generator."""
        sigma = self.recipe.sample_sigma(batch.global_size, batch.generator, x0.device)[batch.rows]
        noise = batch.randn(*x0.shape[1:]).to(x0.dtype)
        return denoising_loss(self.denoiser, x0, sigma, self.recipe.weight(sigma), noise=noise, cond=cond).mean()

    @torch.no_grad()
    def draw_prior(self) -> None:
        """DreamBooth's class images (Ruiz et al. 2023, eq. 2): ``finetune.prior_samples`` samples of the base,
        drawn once from its weights (seeded, on the training device) with the config's sampler; class-conditional
        bases cycle through the classes. A resumed run draws the same ones."""
        n, k, s = self.cfg.finetune.prior_samples, self.cfg.model.num_classes, self.cfg.sample
        t = self.cfg.train.device
        device = torch.device(t if t != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.prior_labels = torch.arange(n) % k if k else None
        net = self.net.to(device).eval()
        den = build_denoiser(net, self.recipe, self.cfg.diffusion)
        cond = self.prior_labels.to(device) if self.prior_labels is not None else None
        res = sample(den, (n, *self.data_shape), self.recipe.process, s.sampler, s.steps, s.schedule, cond=cond,
                     seed=self.cfg.seed + 7919, device=device)  # fmt: skip
        self.net.train().to("cpu")
        self._prior = res.samples.float()

    @property
    def static_graph(self) -> bool:  # prior preservation runs the network twice before one backward
        return self.cfg.finetune.prior_weight == 0

    @property
    def graphable(self) -> bool:  # prior preservation picks its images on the host
        return self.cfg.finetune.prior_weight == 0

    def distribute_copies(self, shard: Callable[[nn.Module], nn.Module]) -> None:
        if self.ema is not None:
            shard(self.ema.model)
            self.ema.refresh()

    def after_step(self, step: int | Tensor) -> None:
        if self.ema is not None:
            self.ema.update(self.net, step)

    def saved_modules(self) -> tuple[nn.Module, nn.Module | None]:
        return self.net, (self.ema.model if self.ema is not None else None)

    def ema_denoiser(self) -> Denoiser:
        """D of the averaged weights (the raw ones without EMA), in eval mode, σ-range checked."""
        net = self.ema.model if self.ema is not None else self.net
        return build_denoiser(net.eval(), self.recipe, self.cfg.diffusion).eval()

    @torch.no_grad()
    def generate(self, n: int, seed: int) -> tuple[Tensor, Tensor | None]:
        """n samples of the EMA model with the configured sampler; conditional models cycle through the classes
        (text-conditioned ones through the first captions of the training set)."""
        s = self.cfg.sample
        k = self.cfg.model.num_classes or (len(self.captions.pooled) - 1 if self.captions is not None else 0)
        device = next(self.net.parameters()).device
        labels = torch.arange(n, device=device) % k if k else None
        shape = (n, *self.data_shape)
        res = sample(self.ema_denoiser(), shape, self.recipe.process, s.sampler, s.steps, s.schedule,
                     cond=self.condition(labels, n) if k else None, seed=seed, device=device)  # fmt: skip
        self.net.train()
        if self.autoencoder is not None:
            return self.autoencoder.decode(res.samples / self.autoencoder.scaling_factor).clamp(-1, 1), labels
        return res.samples, labels
