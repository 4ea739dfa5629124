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
    """Old records updated with this run's verdicts; mutants this run did not check keep their old verdict."""
    rows = json.loads(RECORDS.read_text()) if RECORDS.exists() else {}
    rows.update({k: v for k, v in fresh.items() if v != "not checked" or k not in rows})
    RECORDS.write_text(json.dumps(dict(sorted(rows.items())), indent=0))
    return rows


def module_of(mutant: str) -> str:
    return mutant.split(".x")[0].split(".xǁ")[0]


def write_report(rows: dict[str, str], meta: dict) -> None:
    by_module: dict[str, Counter] = defaultdict(Counter)
    survivors = defaultdict(list)
    for name, status in rows.items():
        m = module_of(name)
        by_module[m][status] += 1
        if status == "survived":
            survivors[m].append(name)
    table = []
    for m, c in sorted(by_module.items()):
        killed = c["killed"] + c["timeout"]
        scored = killed + c["survived"] + c["no tests"]
        table.append({"module": m, "killed": c["killed"], "timed_out": c["timeout"], "survived": c["survived"],
                      "not_covered": c["no tests"], "not_checked": c["not checked"],
                      "score": killed / scored if scored else None})  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mutation.json").write_text(json.dumps({"meta": meta, "modules": table, "survivors": survivors}, indent=1))
    lines = [
        "# Mutation score of the numerical core",
        "",
        f"`{meta['command']}` — {meta['date']}, mutmut {meta['mutmut']}. Score = (killed + timed out) / (killed +",
        "timed out + survived + not covered), mutmut's convention (a time-out is a changed behaviour the tests",
        "noticed, if only by not finishing); mutants not checked (the run stopped first) are left out.",
        "",
        meta.get("note", ""),
        "",
        "| module | killed | timed out | survived | not covered | not checked | score |",
        "|---|---|---|---|---|---|---|",
    ]
    unchecked = [r for r in table if r["score"] is None]
    for r in (r for r in table if r["score"] is not None):
        score = f"{r['score']:.0%}" if r["score"] is not None else ""
        lines.append(
            f"| {r['module']} | {r['killed']} | {r['timed_out']} | {r['survived']} | {r['not_covered']} | "
            f"{r['not_checked']} | {score} |"
        )
    if unchecked:
        lines += ["", f"Not checked yet: {', '.join(r['module'] for r in unchecked)}."]
    lines += ["", "## Survivors", ""]
    for m, names in sorted(survivors.items()):
        lines += [
            f"- {m}: " + ", ".join(n.split("__mutmut_")[0].split("ǁ")[-1] + "#" + n.split("_")[-1] for n in names)
        ]
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
    write_report(merged(results()), meta)


if __name__ == "__main__":
    main()
