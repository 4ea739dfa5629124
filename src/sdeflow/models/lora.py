"""LoRA adapters (Hu et al. 2021) on a frozen backbone, through Hugging Face peft.

A target layer W becomes W x + (α / r) · s · B A x with A (r × in) random, B (out × r) zero at the start (so an
untrained adapter changes nothing), r the rank, α its scale and s the inference-time scale. Only A and B train;
the base's weights never change, and an adapter is saved alone (safetensors + ``adapter.json``) with a fingerprint
of the base's architecture, so that it is only ever loaded onto the network it was trained for.

Targets are groups of layers named the same way in every backbone (``attention``: the q/k/v and output
projections; ``mlp``: the Transformer MLPs; ``conv``: the UNet's residual 3×3 convolutions; ``ada``: DiT's adaLN
modulation) or regular expressions over module names (peft's full-match rule).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = [
    "TARGET_GROUPS",
    "LoraSpec",
    "activate_lora",
    "active_lora",
    "add_lora",
    "architecture_fingerprint",
    "load_lora",
    "lora_layers",
    "lora_targets",
    "merge_lora",
    "save_lora",
    "set_lora_scale",
    "unmerge_lora",
]

TARGET_GROUPS = {
    "attention": r"(.*\.)?(qkv|proj|to_q|to_k|to_v|to_out)",
    "mlp": r"(.*\.)?(blocks\.\d+\.((x|ctx)\.)?mlp\.\d+|ff\.proj|ff\.out)",
    "conv": r"(.*\.)?(conv0|conv1)",
    "ada": r"(.*\.)?ada\.1",
}
WEIGHTS, META = "adapter.safetensors", "adapter.json"


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention", "mlp"])


def architecture_fingerprint(net: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the class and every parameter's name and shape (adapters excluded): equal for
    two networks an adapter fits, whatever their weights."""
    h = hashlib.sha256(type(net).__name__.encode())
    for name, p in net.named_parameters():
        if "lora_" not in name:
            h.update(f"{name.replace('.base_layer', '')}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def lora_targets(net: nn.Module, targets: list[str]) -> list[str]:
    """The names of the Linear / Conv2d modules of ``net`` that ``targets`` select, in module order."""
    patterns = [re.compile(TARGET_GROUPS.get(t, t)) for t in targets]
    names = [n for n, m in net.named_modules()  # a layer holding adapters already counts as its base layer
             if isinstance(getattr(m, "base_layer", m), (nn.Linear, nn.Conv2d)) and "lora_" not in n
             and "base_layer" not in n and any(p.fullmatch(n) for p in patterns)]  # fmt: skip
    if not names:
        raise ValueError(f"lora targets {targets} select no Linear or Conv2d layer of this {type(net).__name__}")
    return names


def _width(m: nn.Module) -> int:
    m = getattr(m, "base_layer", m)
    if isinstance(m, nn.Linear):
        return min(m.in_features, m.out_features)
    return min(m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups, m.out_channels)  # type: ignore[operator]


def add_lora(net: nn.Module, spec: LoraSpec, name: str = "default") -> list[nn.Parameter]:
    """Inject adapter ``name`` into ``net`` (in place; the base frozen) and return its trainable parameters.
    A rank above a target layer's own rank (min of its input and output widths) is refused by name."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError("LoRA adapters need peft: pip install 'sdeflow[lora]'") from None

    modules = dict(net.named_modules())
    names = lora_targets(net, spec.targets)
    too_big = [f"{n} (rank ≤ {_width(modules[n])})" for n in names if spec.rank > _width(modules[n])]
    if too_big:
        raise ValueError(f"lora rank {spec.rank} is larger than the layer allows: {', '.join(too_big[:4])}")
    if spec.rank < 1 or spec.alpha <= 0 or not 0 <= spec.dropout < 1:
        raise ValueError(f"lora needs rank >= 1, alpha > 0 and dropout in [0, 1), got {spec}")
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names)
    net.requires_grad_(False)
    with warnings.catch_warnings():  # a second adapter on the same network is what we mean
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(cfg, net, adapter_name=name)
    params = [p for n, p in net.named_parameters() if f"lora_A.{name}." in n or f"lora_B.{name}." in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in net.modules() if isinstance(m, LoraLayer)]


def lora_state(net: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s weights, keyed without the adapter name (what :func:`save_lora` writes)."""
    tag = f".{name}."
    return {k.replace(tag, "."): v.detach().cpu().contiguous() for k, v in net.state_dict().items()
            if ("lora_A" in k or "lora_B" in k) and tag in k}  # fmt: skip


def save_lora(net: nn.Module, folder: str | Path, spec: LoraSpec, name: str = "default",
              base_fingerprint: str | None = None) -> Path:  # fmt: skip
    """Write adapter ``name`` alone: ``adapter.safetensors`` and ``adapter.json`` (spec, target layers, the base's
    architecture fingerprint, the weights' SHA-256), into a temporary folder renamed into place."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = lora_state(net, name)
    if not state:
        raise ValueError(f"the network holds no LoRA adapter named '{name}'")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=folder.parent))
    save_file(state, str(tmp / WEIGHTS))
    targets = sorted({k.split(".lora_")[0].replace(".base_layer", "") for k in state})
    meta = {"format": "sdeflow-lora-1", "spec": asdict(spec), "target_modules": targets,
            "base_architecture": base_fingerprint or architecture_fingerprint(net),
            "sha256": hashlib.sha256((tmp / WEIGHTS).read_bytes()).hexdigest()}  # fmt: skip
    (tmp / META).write_text(json.dumps(meta, indent=1))
    import shutil

    old = None
    if folder.exists():  # the previous adapter moves aside first: a crash never leaves neither
        old = Path(tempfile.mkdtemp(prefix=".old_", dir=folder.parent))
        os.replace(folder, old / folder.name)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_lora(net: nn.Module, folder: str | Path, name: str = "default", scale: float = 1.0) -> LoraSpec:
    """Add the adapter saved in ``folder`` to ``net`` as ``name`` (inference: frozen), after checking that it was
    trained on a network of this architecture and that its file is intact."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, weights = folder / META, folder / WEIGHTS
    for p in (meta_path, weights):
        if not p.is_file():
            raise CheckpointError(f"{p} not found: not a LoRA adapter folder (written by sdeflow's save_lora)")
    meta = json.loads(meta_path.read_text())
    want, have = meta.get("base_architecture"), architecture_fingerprint(net)
    if want != have:
        raise CheckpointError(
            f"the LoRA adapter {folder} was trained for another base network (architecture {want}, this one is "
            f"{have}): load it onto the model it was trained on"
        )
    if hashlib.sha256(weights.read_bytes()).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{weights} does not match the checksum in {meta_path}: the file is damaged")
    spec = LoraSpec(**meta["spec"])
    spec.targets = list(meta["target_modules"])
    add_lora(net, LoraSpec(spec.rank, spec.alpha, 0.0, spec.targets), name)
    state = {k.replace(".lora_A.", f".lora_A.{name}.").replace(".lora_B.", f".lora_B.{name}."): v
             for k, v in load_file(str(weights)).items()}  # fmt: skip
    missing = set(state) - set(net.state_dict())
    if missing:
        raise CheckpointError(f"{weights} holds weights for layers this network lacks: {sorted(missing)[:3]}")
    net.load_state_dict(state, strict=False)
    net.requires_grad_(False)
    set_lora_scale(net, scale, name)
    return spec


def set_lora_scale(net: nn.Module, scale: float, name: str = "default") -> None:
    """Scale adapter ``name``'s update: W x + s (α / r) B A x (s = 1 as trained, 0 switches it off)."""
    for m in lora_layers(net):
        if name in m.scaling:
            m.scaling[name] = scale * m.lora_alpha[name] / m.r[name]


def active_lora(net: nn.Module) -> list[str]:
    """The names of the adapters that act now."""
    return sorted({a for m in lora_layers(net) for a in m.active_adapters})


def activate_lora(net: nn.Module, names: list[str]) -> None:
    """The adapters that act (their updates add up): ``names`` of those loaded."""
    for m in lora_layers(net):
        m.set_adapter(names)
    net.requires_grad_(False)


def merge_lora(net: nn.Module, names: list[str] | None = None) -> None:
    """Fold the active adapters into the base weights (W ← W + s (α / r) B A): no extra cost per call."""
    for m in lora_layers(net):
        m.merge(adapter_names=names)


def unmerge_lora(net: nn.Module) -> None:
    """Take merged adapters back out of the base weights (to float rounding)."""
    for m in lora_layers(net):
        m.unmerge()
