"""``sdeflow export``: a checkpoint (a sharded FSDP one above all) as one-file safetensors weights."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "export"]


def add_parser(sub) -> None:
    x = sub.add_parser("export", help="write a (sharded) checkpoint as single-file safetensors weights for sampling")
    x.add_argument("checkpoint", help="a checkpoint folder (step_…) of any run, sharded or not")
    x.add_argument("--out", required=True, help="the folder the exported step_… folder goes into")
    x.set_defaults(func=export)


def export(args: argparse.Namespace) -> int:
    from ..checkpoint import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out))
    return 0
