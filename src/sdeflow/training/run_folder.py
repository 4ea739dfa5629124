"""A run folder holds one run: starting into a folder that holds another needs ``resume`` or ``overwrite``, a
resume must not silently change the run's settings, and what a killed run left behind is tidied on start."""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import RunFolderError

__all__ = ["RESUMABLE_CHANGES", "check_disk", "check_resume_config", "prepare", "truncate_metrics"]

# Settings a resumed run may change: how long it runs, how it logs and checkpoints, where and how fast it
# computes, and the figures' sampler. Everything else (data, model, recipe, optimizer, lr, batch, seed…) shapes
# the updates, so changing it mid-run would train a different run under the same name.
RESUMABLE_CHANGES = (
    "name",
    "out_dir",
    "train.steps",
    "train.log_every",
    "train.sample_every",
    "train.ckpt_every",
    "train.keep_last",
    "train.tensorboard",
    "train.device",
    "train.num_workers",
    "train.compile",
    "train.compile_mode",
    "train.compile_options",
    "train.attention_backend",
    "train.norm_backend",
    "train.activation_checkpointing",
    "train.cuda_graph",
    "train.parallel.reshard_after_forward",
    "train.divergence_factor",
    "train.divergence_window",
    "sample",
)


def _holds_a_run(out: Path) -> bool:
    return any((out / name).exists() for name in ("checkpoints", "metrics.jsonl", "config.yaml", "summary.json"))


def prepare(out: Path, resume: bool | str | Path, overwrite: bool) -> Path | None:
    """Refuse to start a run in a folder that holds another one: a new run, or a resume from a checkpoint outside
    the folder (which would continue a different run there); with ``overwrite``, move the old run aside to
    ``<out>.replaced-<UTC time>`` (returned) instead of deleting anything. Then remove the temporary folders a
    kill mid-checkpoint leaves (``checkpoints/.step_*``, ``.old_*``), and check that the folder is writable."""
    moved = None
    here = resume is True or (bool(resume) and Path(resume).resolve().is_relative_to(out.resolve()))
    if _holds_a_run(out) and not here:
        if not overwrite:
            what = (
                f"and {resume} belongs to another: resuming it here would mix the two runs; choose another --out"
                if resume
                else "pass --resume to continue it or --overwrite to move it aside (or choose another --out)"
            )
            raise RunFolderError(f"{out} already holds a run, {what}")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        moved = out.with_name(f"{out.name}.replaced-{stamp}")
        os.rename(out, moved)
    ckpt = out / "checkpoints"
    if ckpt.is_dir():
        for stale in [*ckpt.glob(".step_*"), *ckpt.glob(".old_*")]:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"cannot write to the run folder {out}: {e.strerror or e}") from None
    return moved


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("kwargs", "process_kwargs", "compile_options"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume_config(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse a resume whose config changes anything but :data:`RESUMABLE_CHANGES`, naming every difference."""
    a, b = _flatten(saved), _flatten(now)
    changed = [
        f"{k}: {a.get(k)!r} in the run, {b.get(k)!r} now"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)
    ]
    if changed:
        raise RunFolderError(
            "resuming would change the run's settings: " + "; ".join(changed) + ". Resume with the run's own "
            f"settings, or start a new run (another --out). A resume may change only {', '.join(RESUMABLE_CHANGES)}."
        )


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps up to ``step``: the steps after the checkpoint are trained again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    path.write_text("".join(f"{line}\n" for line in kept))


def check_disk(out: Path, checkpoint_bytes: int) -> None:
    """Refuse to start when the disk cannot take two checkpoints (a new one is written beside the last)."""
    free = shutil.disk_usage(out).free
    if free < 2 * checkpoint_bytes:
        raise RunFolderError(
            f"not enough disk for checkpoints under {out}: one takes about {checkpoint_bytes / 2**20:.0f} MiB and "
            f"{free / 2**20:.0f} MiB are free (two are needed while one is replaced)"
        )
