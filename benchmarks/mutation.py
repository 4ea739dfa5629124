"""Mutation score of the numerical core: mutmut changes one token at a time (an operator, a constant, a call
argument) and reruns the tests that cover the changed function; a mutant the tests do not notice "survives".

The modules and the tests are configured under ``[tool.mutmut]`` in pyproject.toml. Slow on 2 cores (minutes per
module), so it runs outside CI, by module:

    python benchmarks/mutation.py [--modules sdeflow.sampling.steps,sdeflow.training.ema] [--report-only]

Writes ``results/mutation.{json,md}``: per module, killed (a test failed or timed out), survived, not covered.
Score = killed / (killed + survived + not covered); each survivor is listed, for the note to explain.

Each run's verdicts are merged into ``results/mutation-records.json`` (mutant → status), so runs by module, or one on
a machine with more cores (``--max-children 16``), add up to one table; a mutant re-run replaces its old verdict.
Adding tests can only turn survivors into kills, so old verdicts stay valid; rerun the survivors after a test is added.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutation_review import classify

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
RECORDS = OUT / "mutation-records.json"


def results() -> dict[str, str]:
    """mutant name → status, from mutmut's own records."""
    cmd = [sys.executable, "-m", "mutmut", "results", "--all", "true"]
    text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout
    pairs = (line.strip().rsplit(": ", 1) for line in text.splitlines() if ": " in line)
    return {name: status for name, status in pairs}


def merged(fresh: dict[str, str]) -> dict[str, str]:
    """The current mutants with this run's verdicts; those this run did not check keep their recorded verdict (a
    mutant of code that has changed since is a new mutant: its old record is dropped)."""
    old = json.loads(RECORDS.read_text()) if RECORDS.exists() else {}
    rows = {k: v if v != "not checked" else old.get(k, v) for k, v in fresh.items()}
    RECORDS.write_text(json.dumps(dict(sorted(rows.items())), indent=0))
    return rows


def module_of(mutant: str) -> str:
    return mutant.split(".x")[0].split(".xǁ")[0]


def pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def review(rows: dict[str, str]) -> dict[str, dict]:
    """Each survivor's diff and its category (mutation_review.py says why each category is what it is)."""
    out = {}
    for name in (n for n, status in rows.items() if status == "survived"):
        show = [sys.executable, "-m", "mutmut", "show", name]
        text = subprocess.run(show, cwd=ROOT, capture_output=True, text=True).stdout
        diff = [x for x in text.splitlines() if x[:1] in "-+" and not x.startswith(("---", "+++"))]
        category, reason = classify(name, diff)
        out[name] = {"category": category, "reason": reason, "diff": diff}
    return out


def write_report(rows: dict[str, str], meta: dict) -> None:
    by_module: dict[str, Counter] = defaultdict(Counter)
    reviewed = review(rows)
    for name, status in rows.items():
        by_module[module_of(name)][status] += 1
        if status == "survived":
            by_module[module_of(name)][reviewed[name]["category"]] += 1
    table = []
    for m, c in sorted(by_module.items()):
        killed = c["killed"] + c["timeout"]
        missing = c["missing test"] + c["no tests"]
        excused = c["device"] + c["equivalent"] + c["import time"]
        scored = killed + missing + excused
        table.append({"module": m, "killed": c["killed"], "timed_out": c["timeout"], "survived": c["survived"],
                      "not_covered": c["no tests"], "device_only": c["device"],
                      "equivalent": c["equivalent"] + c["import time"], "not_checked": c["not checked"],
                      "score_all": killed / scored if scored else None,
                      "score": killed / (killed + missing) if killed + missing else None})  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    total = {k: sum(r[k] for r in table) for k in ("killed", "timed_out", "survived", "not_covered", "device_only",
                                                    "equivalent", "not_checked")}  # fmt: skip
    caught = total["killed"] + total["timed_out"]
    missing = total["survived"] - total["device_only"] - total["equivalent"] + total["not_covered"]
    total["score_all"] = caught / (caught + total["survived"] + total["not_covered"])
    total["score"] = caught / (caught + missing)
    (OUT / "mutation.json").write_text(json.dumps({"meta": meta, "total": total, "modules": table,
                                                   "survivors": reviewed}, indent=1, ensure_ascii=False))  # fmt: skip
    lines = [
        "# Mutation score of the numerical core",
        "",
        f"`{meta['command']}` — {meta['date']}, mutmut {meta['mutmut']}.",
        "",
        meta.get("note", ""),
        "",
        "Caught = killed (a test failed) + timed out. **Score** = caught / (caught + survivors that need a test +",
        "not covered): survivors shown equivalent are left out, each with its reason below (benchmarks/",
        "mutation_review.py). *All* = caught / all mutants, nothing left out. *Device-only* mutants move a tensor",
        "between devices, which changes nothing on the CPU-only machines that run this (tests/test_cuda.py covers",
        "those paths on a GPU).",
        "",
        "| module | killed | timed out | survived | of which device-only | of which equivalent | not covered | "
        "score | all |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [*table, {"module": "**total**", **total}]:
        lines.append(
            f"| {r['module']} | {r['killed']} | {r['timed_out']} | {r['survived']} | {r['device_only']} | "
            f"{r['equivalent']} | {r['not_covered']} | {pct(r['score'])} | {pct(r['score_all'])} |"
        )
    if total["not_checked"]:
        lines += ["", f"Not checked: {total['not_checked']} mutants (left out of both scores)."]
    for category in ("missing test", "equivalent", "import time", "device"):
        names = sorted(n for n, v in reviewed.items() if v["category"] == category)
        lines += ["", f"## Survivors: {category} ({len(names)})", ""]
        lines += [f"- `{n.removeprefix('sdeflow.')}`: {reviewed[n]['reason']}" for n in names]
    (OUT / "mutation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", help="comma-separated modules, e.g. sdeflow.sampling.steps (default: all configured)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--max-children", type=int, help="parallel test workers (default: mutmut's, one per core)")
    ap.add_argument("--mutants", help="comma-separated mutant names to rerun (e.g. the survivors)")
    ap.add_argument("--note", default="", help="a line under the table's heading (e.g. how the run ended)")
    args = ap.parse_args()
    if not args.report_only:
        patterns = [f"{m}*" for m in args.modules.split(",")] if args.modules else []
        patterns += args.mutants.split(",") if args.mutants else []
        jobs = ["--max-children", str(args.max_children)] if args.max_children else []
        subprocess.run([sys.executable, "-m", "mutmut", "run", *jobs, *patterns], cwd=ROOT, check=False)
    import mutmut

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mutmut": getattr(mutmut, "__version__", "?"),
        "command": "python benchmarks/mutation.py" + (f" --modules {args.modules}" if args.modules else ""),
        "note": args.note,
    }
    # a run merges its verdicts into the records; --report-only reports the records as they are
    write_report(json.loads(RECORDS.read_text()) if args.report_only else merged(results()), meta)


if __name__ == "__main__":
    main()
