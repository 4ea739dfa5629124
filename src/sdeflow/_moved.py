"""Old module paths keep working: ``import sdeflow.samplers`` gives ``sdeflow.sampling.samplers``, and so on.

A meta-path finder answers for the old names only, and only when they are imported, so importing ``sdeflow``
still loads no training code. The table is the whole record of what moved where.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

MOVED = {
    "sdeflow.process": "sdeflow.core.process",
    "sdeflow.preconditioning": "sdeflow.core.preconditioning",
    "sdeflow.losses": "sdeflow.core.losses",
    "sdeflow.mixture": "sdeflow.core.mixture",
    "sdeflow.schedules": "sdeflow.sampling.schedules",
    "sdeflow.samplers": "sdeflow.sampling.samplers",
    "sdeflow.guidance": "sdeflow.sampling.guidance",
    "sdeflow.likelihood": "sdeflow.sampling.likelihood",
    "sdeflow.metrics": "sdeflow.evaluation.metrics",
    "sdeflow.inception": "sdeflow.evaluation.inception",
    "sdeflow.ema": "sdeflow.training.ema",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec) -> ModuleType:
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its new name


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
