"""From a config (or a checkpoint's config) to objects: recipe, network, denoiser, and the one-call loader.

Inference (``sdeflow sample``, ``eval``, ``nll``, :func:`sdeflow.load`) builds everything from here and never
imports the trainer; the trainer builds its objective from the same functions, so both ends see the same model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, check_finite, load_checkpoint, load_weights
from .config import ConfigError, DiffusionConfig, ExperimentConfig, ModelConfig, TextConfig, config_from_dict
from .config_objectives import DENOISER_OBJECTIVES, AutoencoderConfig
from .core.losses import Recipe, recipe
from .core.preconditioning import Denoiser
from .core.process import Process, get_process
from .models import build_model
from .models.autoencoder import Autoencoder, AutoencoderKL, VQAutoencoder
from .models.controlnet import ControlledNet, ControlNet, DiTControlNet
from .models.dit import DiT
from .models.lora import LoraSpec, add_lora
from .models.text_encoder import TextEncoder
from .models.unet import UNet
from .sampling.optimize import read_schedules

__all__ = [
    "LoadedModel",
    "build_autoencoder",
    "build_denoiser",
    "build_network",
    "build_recipe",
    "checkpoint_config",
    "load",
    "load_autoencoder",
    "load_text_encoder",
]


def build_recipe(cfg: DiffusionConfig) -> Recipe:
    """The recipe named by ``diffusion.recipe`` with any of its parts overridden."""
    r = recipe(cfg.recipe)
    over: dict[str, Any] = {"sigma_data": cfg.sigma_data}
    if cfg.process is not None or cfg.process_kwargs:
        name = cfg.process if cfg.process is not None else r.process.name
        try:
            over["process"] = get_process(name, **cfg.process_kwargs)
        except TypeError as e:
            raise ConfigError(f"diffusion.process_kwargs do not fit process '{name}': {e}") from None
    for key in ("parameterization", "sigma_sampling", "weighting"):
        if getattr(cfg, key) is not None:
            over[key] = getattr(cfg, key)
    return replace(r, **over)


def build_network(
    cfg: ModelConfig, data_shape: tuple[int, ...], text_widths: tuple[int, int] | None = None
) -> nn.Module:
    """The backbone for data of shape ``data_shape`` (C, H, W) or (D,); ``text_widths``: (token, pooled) widths
    of the text encoder of a text-conditioned model."""
    kw = dict(cfg.kwargs)
    if cfg.num_classes:
        kw["num_classes"] = cfg.num_classes
    if text_widths is not None:
        if cfg.kind not in ("unet", "mmdit"):
            raise ConfigError(f"model.kind '{cfg.kind}' takes no text: use 'unet' (cross-attention) or 'mmdit'")
        kw["context_dim"], kw["pooled_dim"] = text_widths
    if cfg.kind == "mlp":
        kw.setdefault("dim", math.prod(data_shape))
        return build_model("mlp", **kw)
    if len(data_shape) != 3:
        raise ConfigError(f"model.kind '{cfg.kind}' needs image data (C, H, W), got shape {data_shape}")
    size_key = "img_resolution" if cfg.kind == "unet" else "input_size"  # dit, mmdit
    kw.setdefault(size_key, data_shape[-1])
    kw.setdefault("in_channels", data_shape[0])
    try:
        return build_model(cfg.kind, preset=cfg.preset, **kw)
    except TypeError as e:
        raise ConfigError(f"model.kwargs do not fit model.kind '{cfg.kind}': {e}") from None
    except ValueError as e:
        raise ConfigError(f"model.preset / model.kwargs: {e}") from None


def build_denoiser(net: nn.Module, r: Recipe, cfg: DiffusionConfig, check_range: bool = True) -> Denoiser:
    """D(x, σ, cond) around ``net`` with the recipe's process and parameterization."""
    return Denoiser(net, r.process, r.parameterization, cfg.sigma_data, cfg.time_scale, check_range, cfg.consistency)


def checkpoint_config(ck: dict[str, Any]) -> tuple[ExperimentConfig, tuple[int, ...]]:
    """(config, data shape) stored in a checkpoint read by :func:`~sdeflow.checkpoint.load_checkpoint`."""
    meta = ck["meta"]
    try:
        return config_from_dict(meta["config"]), tuple(meta["data_shape"])
    except KeyError as e:
        raise CheckpointError(f"{ck['path']}/meta.json lacks {e}: not written by sdeflow's trainer") from None
    except ConfigError as e:
        raise CheckpointError(f"the config stored in {ck['path']}/meta.json is invalid: {e}") from None


def resolve_base(cfg: ExperimentConfig) -> tuple[ExperimentConfig, dict[str, Any] | None]:
    """For a fine-tuning run (``finetune.base``): the config with the base run's model, diffusion and text
    sections, and the base checkpoint (read and verified); else ``(cfg, None)``. A consistency model's denoiser
    keeps its boundary condition (``diffusion.consistency``)."""
    if cfg.objective == "consistency" and not cfg.diffusion.consistency:
        cfg = replace(cfg, diffusion=replace(cfg.diffusion, consistency=True))
    if not cfg.finetune.base:
        return cfg, None
    base, out = Path(cfg.finetune.base).resolve(), Path(cfg.out_dir).resolve()
    if base == out or out in base.parents:  # starting afresh there would move the base aside, resuming would mix them
        raise ConfigError(f"finetune.base {cfg.finetune.base} lies inside this run's out_dir {cfg.out_dir}: "
                          "fine-tune into another folder")  # fmt: skip
    try:
        ck = load_checkpoint(cfg.finetune.base)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (finetune.base)") from None
    if ck["meta"].get("objective", "diffusion") not in DENOISER_OBJECTIVES:
        raise CheckpointError(f"finetune.base {ck['path']} is not a diffusion model's checkpoint")
    base_cfg, _ = checkpoint_config(ck)
    if base_cfg.finetune.method == "lora":
        raise CheckpointError(
            f"finetune.base {ck['path']} is itself a LoRA run: fine-tune its base and load both adapters instead"
        )
    diffusion = replace(base_cfg.diffusion, consistency=cfg.objective == "consistency")
    return replace(cfg, model=base_cfg.model, diffusion=diffusion, text=base_cfg.text), ck


def controlled(cfg: ExperimentConfig, net: nn.Module) -> nn.Module:
    """A ``finetune.method: controlnet`` run's network: the base under one ControlNet (else ``net`` as it is)."""
    if cfg.finetune.method != "controlnet":
        return net
    if cfg.diffusion.autoencoder:
        raise ConfigError("finetune.method 'controlnet' works in pixel space; the base is a latent diffusion model")
    from .data.control import control_channels

    channels = control_channels(cfg.finetune.control)
    if isinstance(net, UNet):
        return ControlledNet(net, [ControlNet(net, channels)])
    if isinstance(net, DiT):  # and MM-DiT
        try:
            return ControlledNet(net, [DiTControlNet(net, channels, cfg.finetune.control_blocks)])
        except ValueError as e:
            raise ConfigError(f"finetune.control_blocks: {e}") from None
    raise ConfigError(f"finetune.method 'controlnet' controls a UNet, DiT or MM-DiT; the base is '{cfg.model.kind}'")


def lora_spec(cfg: ExperimentConfig) -> LoraSpec | None:
    """The adapter a ``finetune.method: lora`` config trains (None for full fine-tuning and plain training)."""
    f = cfg.finetune
    if f.method != "lora":
        return None
    return LoraSpec(f.lora_rank, f.lora_alpha, f.lora_dropout, list(f.lora_targets))


def build_autoencoder(cfg: AutoencoderConfig, data_shape: tuple[int, ...]) -> Autoencoder:
    """The KL or VQ autoencoder of an ``autoencoder`` config section for images of shape ``data_shape``."""
    if len(data_shape) != 3:
        raise ConfigError(f"an autoencoder needs image data (C, H, W), got shape {data_shape}")
    kw = dict(in_channels=data_shape[0], channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
              latent_channels=cfg.latent_channels, groups=cfg.groups, mid_attention=cfg.mid_attention)  # fmt: skip
    if cfg.kind == "vq":
        return VQAutoencoder(**kw, codebook_size=cfg.codebook_size, decay=cfg.codebook_decay, cosine=cfg.cosine)
    return AutoencoderKL(**kw)


def load_autoencoder(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> Autoencoder:
    """The autoencoder of a checkpoint written by an ``objective: autoencoder`` run (its EMA weights if it kept
    them), or of a diffusers ``AutoencoderKL`` folder; frozen, in eval mode. The error names a missing path."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"autoencoder checkpoint not found: {p} (diffusion.autoencoder)")
    if (p / "config.json").is_file() and (p / "diffusion_pytorch_model.safetensors").is_file():
        return AutoencoderKL.from_diffusers(p).eval().requires_grad_(False).to(device)
    try:
        ck = load_checkpoint(p)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (diffusion.autoencoder)") from None
    meta = ck["meta"]
    if meta.get("objective") != "autoencoder":
        raise CheckpointError(
            f"{ck['path']} was trained with objective '{meta.get('objective', 'diffusion')}', not 'autoencoder' "
            "(diffusion.autoencoder must point to an autoencoder run's checkpoint)"
        )
    cfg, shape = checkpoint_config(ck)
    ae = build_autoencoder(cfg.autoencoder, shape)
    use_ema = ema and cfg.train.ema.kind != "none"
    weights = ck["ema"] if use_ema else {k[12:]: v for k, v in ck["model"].items() if k.startswith("autoencoder.")}
    source = f"{ck['path']}/{'ema' if use_ema else 'model'}.safetensors"
    check_finite(weights, source)
    load_weights(ae, weights, source)
    return ae.eval().requires_grad_(False).to(device)


def load_text_encoder(
    cfg: TextConfig, device: str | torch.device = "cpu", trained: dict[str, Any] | None = None
) -> TextEncoder:
    """The frozen text encoder ``text.encoder`` names. ``trained``: a checkpoint's meta, whose token width the
    encoder must have (else the model cannot read its embeddings) and whose fingerprint it should have."""
    try:
        enc = TextEncoder.from_folder(cfg.encoder, cfg.max_length, device)  # type: ignore[arg-type]
    except (FileNotFoundError, OSError, ValueError) as e:
        hint = (
            ""
            if trained is None
            else " (if the encoder moved: sdeflow sample --text-encoder DIR, or load(text_encoder=))"
        )
        raise ConfigError(f"text.encoder: {e}{hint}") from None
    if trained is not None and "text_width" in trained:
        if (enc.width, enc.pooled_width) != (trained["text_width"], trained["text_pooled_width"]):
            raise ConfigError(
                f"text.encoder {cfg.encoder} gives embeddings of width {enc.width}, but the model was trained on "
                f"width {trained['text_width']}: use the encoder it was trained with ({trained.get('text_encoder')})"
            )
        if enc.fingerprint() != trained.get("text_fingerprint"):
            warnings.warn(
                f"text.encoder {cfg.encoder} is not the encoder the model was trained with (its weights differ): "
                "prompts may not be understood",
                stacklevel=2,
            )
    return enc


@dataclass
class LoadedModel:
    """What :func:`load` returns: a ready denoiser in eval mode and what sampling it needs."""

    denoiser: Denoiser
    process: Process
    recipe: Recipe
    data_shape: tuple[int, ...]
    num_classes: int
    config: ExperimentConfig
    path: Path
    step: int
    autoencoder: Autoencoder | None = None  # latent diffusion: samples are latents c·z, images decode(z)
    text_encoder: TextEncoder | None = None  # text-to-image: prompts → the network's condition

    def sample_prompts(
        self, prompts: list[str], guidance: float = 1.0, negative_prompt: str = "", **options: Any
    ) -> torch.Tensor:
        """Images (one per prompt, decoded) from a text-to-image model, e.g.
        ``m.sample_prompts(["a red circle above a blue square"], guidance=4, sampler="dpmpp_2m", steps=20, seed=0)``;
        ``options`` go to :func:`~sdeflow.sampling.sample`."""
        from .sampling.prompts import sample_prompts

        if self.text_encoder is None:
            raise ValueError(f"{self.path} is not a text-to-image model (it has no text.encoder)")
        device = next(self.denoiser.parameters()).device
        res = sample_prompts(self.denoiser, self.text_encoder, prompts, self.data_shape, self.process, guidance,
                             negative_prompt, device=device, **options)  # fmt: skip
        return self.decode(res.samples)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Images from samples: the autoencoder's decoder of z = samples / c (the identity in pixel space)."""
        if self.autoencoder is None:
            return samples
        with torch.no_grad():
            z = samples.to(next(self.autoencoder.parameters()).device).float() / self.autoencoder.scaling_factor
            return self.autoencoder.decode(z)


def load(
    checkpoint: str | Path, ema: bool = True, device: str | torch.device = "cpu", text_encoder: str | None = None
) -> LoadedModel:
    """Load a checkpoint folder written by the trainer (checksums verified, no code executed) into a denoiser.

    ``ema``: the EMA weights (default) or the raw ones. ``text_encoder``: where the text encoder of a
    text-to-image model is now, if not where its config says. Example::

        m = sdeflow.load("runs/digits_edm/checkpoints/step_00003000")
        x = sdeflow.sample(m.denoiser, (16, *m.data_shape), m.process, "dpmpp_2m", steps=10).samples
    """
    ck = load_checkpoint(checkpoint)
    meta = ck["meta"]
    objective = meta.get("objective", "diffusion")
    if objective not in DENOISER_OBJECTIVES:
        raise CheckpointError(
            f"{ck['path']} was trained with objective '{objective}'; sdeflow.load builds diffusion denoisers only"
        )
    cfg, shape = checkpoint_config(ck)
    if text_encoder is not None:
        cfg.text = replace(cfg.text, encoder=text_encoder)
    enc = load_text_encoder(cfg.text, device, meta) if cfg.text.encoder else None
    net = build_network(cfg.model, shape, (enc.width, enc.pooled_width) if enc is not None else None)
    spec = lora_spec(cfg)
    if spec is not None:  # a LoRA run's checkpoint holds the base and its adapter: the layers must exist first
        add_lora(net, spec)
    net = controlled(cfg, net)
    which = "ema" if ema else "model"
    check_finite(ck[which], f"{ck['path']}/{which}.safetensors")
    load_weights(net, ck[which], f"{ck['path']}/{which}.safetensors")
    r = build_recipe(cfg.diffusion)
    den = build_denoiser(net.to(device), r, cfg.diffusion).eval()
    sha = meta.get("sha256", {}).get(f"{which}.safetensors")  # schedules optimised for exactly these weights
    den.optimized_schedules = {k: v["sigmas"] for k, v in read_schedules(ck["path"]).items()
                               if v.get("weights_sha256") == sha}  # fmt: skip
    step = int(meta.get("step", 0))
    ae = _latent_autoencoder(cfg, meta, shape, Path(ck["path"]), device) if cfg.diffusion.autoencoder else None
    return LoadedModel(den, r.process, r, shape, cfg.model.num_classes, cfg, Path(ck["path"]), step, ae, enc)


def _latent_autoencoder(
    cfg: ExperimentConfig, meta: dict[str, Any], shape: tuple[int, ...], path: Path, device: str | torch.device
) -> Autoencoder:
    """The autoencoder a latent diffusion checkpoint was trained with, refused if it is not the same one."""
    ae = load_autoencoder(cfg.diffusion.autoencoder, device=device)  # type: ignore[arg-type]
    if len(shape) != 3 or ae.latent_channels != shape[0]:
        raise CheckpointError(
            f"{path} was trained on latents of shape {shape}, but its autoencoder {cfg.diffusion.autoencoder} "
            f"(diffusion.autoencoder) has {ae.latent_channels} latent channels"
        )
    want = meta.get("autoencoder_fingerprint")
    if want is not None and ae.fingerprint() != want:
        raise CheckpointError(
            f"the autoencoder at {cfg.diffusion.autoencoder} (diffusion.autoencoder) is not the one {path} was "
            "trained with (its weights differ): its latents would not match the diffusion model"
        )
    return ae
