"""Why a surviving mutant survives: the review behind the 'equivalent' column of results/mutation.md.

Each survivor's one-line diff (``mutmut show``) is sorted by rules that are each an argument, not a guess:

- ``device``: the change only moves a tensor between devices (a ``device=`` or ``.to(device)`` argument, pinned
  memory, ``non_blocking``, the generator's device). On the CPU-only machines that run the suite and this benchmark
  every tensor lives on the CPU, so the numbers are the same; tests/test_cuda.py runs these paths on a GPU.
- ``import time``: code that runs once when the module is imported (``_preset`` names the fixed samplers). mutmut
  switches a mutant on after the import, so no test can see it.
- ``equivalent``: reviewed one by one in :data:`REVIEWED`, each with the reason it cannot change a result.

Everything else is a ``missing test`` and counts against the score.
"""

from __future__ import annotations

import re

DEVICE = re.compile(r"device|non_blocking|pin_memory|\bdev\b|gdev|cuda")
# lines that only choose a device: where to draw the noise, whether the data live on a GPU
DEVICE_LINES = re.compile(r"^g?dev = |getattr\(self.dataset, \"x\", None\)|== \"cuda\"")

# function (as mutmut names it, after the module) → reason; every mutant of it that survives is equivalent
REVIEWED_FUNCTIONS = {
    "x_GaussianMixture_chunks": "chunk size of the batched oracle: performance only, same numbers",
    "xǁGaussianMixtureǁ_chunks": "chunk size of the batched oracle: performance only, same numbers",
}

SAME_DRAW = "one draw per row: with or without replacement is the same"
INTEGER_GRID = "integer grid points are exact in any dtype and are cast to float64 by the constructor"
LAST_BRANCH = "the oracle's last branch is the variance: any other name reaches it"
CLAMPED = "searchsorted of a clamped log σ is ≤ T − 1"
WIDER_NORM = "a (P,) norm broadcasts over the columns like a (1, P) one"

# (function, changed text before, after) → reason
REVIEWED = {
    ("x__recipes", "50.0", ""): "VEProcess's default σ_max is 50: the recipe restates the default",
    ("x_recipe", "overrides", "(overrides) or True"): "replace() with no overrides returns an equal copy",
    ("x_sample_sigma", "0, ", ""): "torch.randint(0, n) and torch.randint(n) draw the same numbers",
    ("x__dpmpp", "", "="): "η = 0 adds 0 × noise: the same iterate (the generator is not used afterwards)",
    ("x__unipc_update", "d1s", "(d1s) or True"): "the corrector sum over an empty history is 0",
    ("xǁEMAǁ__init__", 'kind == "power"', '(kind == "power") or True'): "γ is read by the power profile only",
    ("xǁEMAǁ__init__", "0", "1"): "γ is read by the power profile only",
    ("xǁEMAǁbeta", "", "="): "t = 1 gives (1 − 1/1)^{γ+1} = 0 either way",
    ("xǁEMAǁbeta", "t > 1", "(t > 1) or True"): "t ≥ 1 here, and t = 1 gives 0 either way",
    ("xǁBatchStreamǁbatch", "", "="): "dropout 0 draws u < 0 never / u ≤ ½ differs from u < ½ with probability 0",
    ("xǁBatchStreamǁbatch", "Fals", "Non"): "getattr default None is falsy like False",
    ("xǁVPDiscreteProcessǁt_of_sigma", "1", "None"): "log σ is clamped to the table: at its first entry the "
    "wrapped index gives weight 1 on the same point",
    ("xǁVPDiscreteProcessǁt_of_sigma", "self.num_steps - 1", "None"): CLAMPED,
    ("xǁVPDiscreteProcessǁt_of_sigma", "self.num_steps - 1", ""): CLAMPED,
    ("xǁVPDiscreteProcessǁt_of_sigma", "-", "+"): CLAMPED,
    ("x_precision_recall", "dim=1", ""): "kthvalue's default dimension is the last, here 1",
    ("x_precision_recall", "torch.bool", "None"): "a float 0/1 mask has the same mean",
    ("x_precision_recall", "dtype=torch.bool", ""): "a float 0/1 mask has the same mean",
    ("x_precision_recall", "1024", ""): "a chunk step of 1 recomputes overlapping chunks: same hits, slower",
    ("x__divergence", "create_graph=False", ""): "create_graph defaults to False",
    ("x__divergence", "Fals", "Tru"): "a graph of the gradient is built and never used: same numbers",
    ("x__divergence", "g.dtyp", "Non"): "float32 zeros promote to g's dtype on the first addition",
    ("x_log_likelihood", "method", "None"): "torchdiffeq's default method is dopri5",
    ("x_log_likelihood", "method=method", ""): "torchdiffeq's default method is dopri5",
    ("x_log_likelihood", "-", "+"): "two time points: index 1 is index −1",
    ("x_log_likelihood", "0", "1"): "every sample has the same size",
    ("xǁGaussianMixtureǁ_stats_chunk", "-", "+"): "sum over the last axis of a 2-D tensor: axis 1 is axis −1",
    ("xǁGaussianMixtureǁ_stats_chunk", "bk,bkd->bd", "BK,BKD->BD"): "einsum labels are case-insensitive names",
    ("xǁGaussianMixtureǁclass_log_prob", "self.num_classes", ""): "one_hot infers max label + 1 = num_classes",
    ("xǁGaussianMixtureǁsample", "Tru", "Fals"): "one draw per row: with or without replacement is the same",
    ("xǁGaussianMixtureǁsample", "replacement=True, ", ""): "one draw per row: with or without replacement is the same",
    ("xǁGaussianMixtureǁgrid_2d", "torch.float64", "None"): INTEGER_GRID,
    ("xǁGaussianMixtureǁgrid_2d", "dtype=torch.float64", ""): INTEGER_GRID,
    ("xǁGaussianMixtureǁ_stats", "outs", "(outs) or True"): "an empty batch is never evaluated",
    ("xǁClassifierFreeGuidanceǁ__call__", "sigma.ndim == 0", "(sigma.ndim == 0) or True"): "expanding a (B,) σ "
    "to B is the identity",
    ("xǁClassifierGuidanceǁ__call__", "sigma.ndim == 0", "(sigma.ndim == 0) or True"): "expanding a (B,) σ to B "
    "is the identity",
    ("x_karras", "n > 1", "(n > 1) or True"): "linspace(0, 1, 1) is [0], the same ramp",
    ("x__append_zero", "torch.float64", "None"): "the zero is cast to float64 by the concatenation",
    ("x_sliced_wasserstein", "keepdim=True", ""): WIDER_NORM,
    ("x_sliced_wasserstein", "Tru", "Fals"): WIDER_NORM,
    ("xǁFeatureStatsǁload", "Fals", "Non"): "np.load refuses pickles unless allow_pickle is true",
    ("xǁFeatureStatsǁload", "allow_pickle=False", ""): "np.load refuses pickles by default",
    ("xǁFeatureStatsǁof", "Fals", "Non"): "rowvar=None is falsy like False",
    ("x__append_zero", "dtype=torch.float64", ""): "torch.cat promotes the zero to float64",
    ("x_ddpm_discrete", "0, ", ""): "np.arange(0, n) is np.arange(n)",
    ("x_karras", "", "="): "linspace(0, 1, 1) is [0], the same ramp",
    ("x_check_schedule", "rtol=rtol", ""): "check_sigma's default rtol is the same 1e-4",
    ("xǁGaussianMixtureǁscore", "torch.float64", "None"): "D* is float64: the difference is promoted",
    ("x_log_likelihood", "y.dtyp", "Non"): "u is already in the data's dtype",
    ("xǁGaussianMixtureǁ_stats", "(0,)", "None"): "an empty batch is never evaluated",
    ("xǁGaussianMixtureǁ_stats", "0", "1"): "an empty batch is never evaluated",
    ("xǁGaussianMixtureǁposterior_variance", '"post_var"', "None"): LAST_BRANCH,
    ("xǁGaussianMixtureǁposterior_variance", "post_var", "POST_VAR"): LAST_BRANCH,
    ("xǁGaussianMixtureǁposterior_variance", "post_var", "XXpost_varXX"): LAST_BRANCH,
    ("x_coefficients", "mps", "XXmpsXX"): "only changes the path on Apple's MPS device",
    ("x_coefficients", "mps", "MPS"): "only changes the path on Apple's MPS device",
    ("x__process_coefficients", "sigma.dtyp", "Non"): "the coefficients are cast to σ's dtype on return",
}


def changed(diff: list[str]) -> tuple[str, str, str] | None:
    """(text before, text after, whole line before) of a one-line change, trimmed to the part that differs."""
    minus = [line[1:].strip() for line in diff if line.startswith("-")]
    plus = [line[1:].strip() for line in diff if line.startswith("+")]
    if len(minus) != 1 or len(plus) != 1:
        return None
    a, b = minus[0], plus[0]
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
        j += 1
    return a[i : len(a) - j], b[i : len(b) - j], a


def classify(name: str, diff: list[str]) -> tuple[str, str]:
    """(category, reason) of one survivor."""
    function = name.split("__mutmut_")[0].rsplit(".", 1)[-1]
    if function == "x__preset":
        return "import time", "runs at import, before mutmut switches the mutant on"
    if function in REVIEWED_FUNCTIONS:
        return "equivalent", REVIEWED_FUNCTIONS[function]
    change = changed(diff)
    if change is None:
        return "missing test", "a change over several lines"
    before, after, line = change
    if DEVICE_LINES.search(line):
        return "device", "chooses a device only: the same numbers on a CPU-only run"
    if (
        (before, after) in (("devic", "Non"), ("device", "None"))
        or before.endswith(".devic")
        or (
            DEVICE.search(line)
            and (DEVICE.search(before) or after in ("", "Non", "None", "Fals", "Tru"))
            and not DEVICE.search(after.replace("None", ""))
        )
    ):
        return "device", "moves a tensor between devices only: the same numbers on a CPU-only run"
    reason = REVIEWED.get((function, before, after))
    if reason:
        return "equivalent", reason
    return "missing test", f"{before!r} → {after!r} in `{line[:90]}`"
