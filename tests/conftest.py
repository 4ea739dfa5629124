import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Under mutmut (benchmarks/mutation.py) every worker runs in `mutants/` with one thread: workers run side by side,
# and mutmut's time-outs count CPU seconds, which extra threads would inflate.
UNDER_MUTMUT = Path.cwd().name == "mutants"
torch.set_num_threads(1 if UNDER_MUTMUT else max(1, min(2, os.cpu_count() or 1)))
# Without a GPU, our Triton kernels are tested in Triton's interpreter, which must be chosen before Triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Under mutmut, each test run gets its own temporary root: parallel workers sharing pytest's numbered folders
    delete each other's (pytest keeps the last three), and the failure that follows would count as a kill."""
    if UNDER_MUTMUT and config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="sdeflow-mutmut-")
        config.add_cleanup(lambda: shutil.rmtree(config.option.basetemp, ignore_errors=True))


def pytest_collection_modifyitems(config, items):
    """Under mutmut, run the fastest tests first: with `-x` a mutant then dies on its cheapest failing test."""
    stats = Path("mutmut-stats.json")
    if UNDER_MUTMUT and stats.exists():
        duration = json.loads(stats.read_text()).get("duration_by_test", {})
        items.sort(key=lambda item: duration.get(item.nodeid, 0.0))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
