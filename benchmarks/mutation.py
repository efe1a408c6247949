"""Mutation testing of the core modules with mutmut 3, module by module, within a time budget.

Each module of ``[tool.axf.mutation.modules]`` (pyproject.toml) is run in its own scratch copy of the
repository (nothing is written to the checkout but the results), with mutmut's ``only_mutate`` set to that
file and its test selection set to the module's test files; mutmut itself then runs, for each mutant,
only the tests that call the mutated function. Survivors listed in ``benchmarks/mutation_equivalent.md``
(name and mutated line must both match) count as equivalent, not as missed.

    python benchmarks/mutation.py                       # every module, 100-minute budget
    python benchmarks/mutation.py --budget 20 axf_pipeline/training/loss.py
    python benchmarks/mutation.py --table REPORT... [--before REPORT...]   # the docs' score table

Writes ``benchmarks/results/mutation/<date>.md`` (score per module, survivors with their diffs) and
``<date>.json`` (raw counts and every survivor). Runs under ``nice -n 19`` with one worker and one thread:
the machine's experiments keep priority. Needs the ``mutation`` extra (``pip install mutmut``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutation"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.md"
KILLED = {1, 3, 36, -24, 24, 152, 255}  # mutmut's exit codes: failing test, or timeout (an endless loop)
SURVIVED = {0}
NO_TESTS = {5, 33}


def modules_from_pyproject() -> dict[str, list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["tool"]["axf"]["mutation"]["modules"]


def equivalents() -> dict[str, str]:
    """``mutant name -> mutated line`` from the equivalents file's entries ``- `name`: `line` — reason``
    (entries whose reason starts with **not killed** document a survivor but do not excuse it)."""
    found = {}
    if EQUIVALENT.is_file():
        for row in EQUIVALENT.read_text().splitlines():
            match = re.match(r"^- `([^`]+__mutmut_\d+)`: `(.*)` — (\S.*)$", row)
            if match and not match[3].startswith("**not killed**"):  # documented survivors still count
                found[match[1]] = match[2].strip()
    return found


def scratch_copy(dest: Path, module: str, tests: list[str]) -> None:
    """The checkout's files (tracked and untracked, not ignored) with a mutmut config for ``module``."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    pyproject = (dest / "pyproject.toml").read_text()
    extra = (
        f"only_mutate = [{json.dumps(module)}]\npytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
    )
    pyproject = pyproject.replace("[tool.mutmut]\n", "[tool.mutmut]\n" + extra, 1)
    (dest / "pyproject.toml").write_text(pyproject)


def run_mutmut(work: Path, seconds: float, log) -> tuple[bool, float]:
    """``mutmut run`` in ``work`` (nice 19, one worker, one thread); False when it ran out of time."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    mutmut = [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.exit(cli())"]
    start = time.monotonic()
    proc = subprocess.Popen(["nice", "-n", "19", *mutmut, "run", "--max-children", "1"], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        proc.wait(timeout=max(1.0, seconds))
        finished = proc.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finished = False
    return finished, time.monotonic() - start


_DIFFS = """import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
names, path = json.loads(sys.stdin.read()), sys.argv[1]
print(json.dumps({name: get_diff_for_mutant(name, path=path) for name in names}))
"""


def mutant_diffs(work: Path, module: str, names: list[str]) -> dict[str, str]:
    """Each mutant's unified diff (one process for all: ``mutmut show`` per mutant is slow)."""
    if not names:
        return {}
    out = subprocess.run(
        [sys.executable, "-c", _DIFFS, module], cwd=work, input=json.dumps(names), capture_output=True,
        text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    return json.loads(out.stdout)


def mutated_line(diff: str) -> str:
    """The first added line of a mutant's diff (what the mutant changed to), stripped."""
    for line in diff.splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            return line[1:].strip()
    return ""


def measure(module: str, tests: list[str], seconds: float, equivalent: dict[str, str], keep: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="axf-mutation-"))
    try:
        scratch_copy(work, module, tests)
        with open(work / "mutmut.log", "w") as log:
            finished, elapsed = run_mutmut(work, seconds, log)
        meta = work / "mutants" / (module + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.is_file() else {}
        counts = {"killed": 0, "survived": 0, "equivalent": 0, "no_tests": 0, "not_checked": 0, "other": 0}
        survivors, stale = [], []
        diffs = mutant_diffs(work, module, [n for n, c in codes.items() if c in SURVIVED or c in NO_TESTS])
        for name, code in sorted(codes.items()):
            if code in KILLED:
                counts["killed"] += 1
            elif code in SURVIVED or code in NO_TESTS:
                diff = diffs[name]
                line = mutated_line(diff)
                if name in equivalent and equivalent[name] == line:
                    counts["equivalent"] += 1
                    continue
                if name in equivalent:
                    stale.append(name)
                counts["survived" if code in SURVIVED else "no_tests"] += 1
                survivors.append({"name": name, "status": "survived" if code in SURVIVED else "no tests",
                                  "line": line, "diff": diff})  # fmt: skip
            elif code is None:
                counts["not_checked"] += 1
            else:
                counts["other"] += 1
        judged = counts["killed"] + counts["survived"] + counts["no_tests"] + counts["other"]
        tail = (work / "mutmut.log").read_text(errors="replace")[-3000:]
        return {
            "module": module,
            "tests": tests,
            "finished": finished and counts["not_checked"] == 0,
            "seconds": round(elapsed, 1),
            "mutants": len(codes),
            **counts,
            # equivalent mutants are left out of the denominator; untested ones count as missed
            "score": round(100 * counts["killed"] / judged, 1) if judged else None,
            "survivors": survivors,
            "stale_equivalents": stale,
            "log_tail": tail if not codes or not finished else "",
        }
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def write_report(results: list[dict], date: str, budget: float, started: float) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = {"date": date, "budget_minutes": budget, "minutes": round((time.monotonic() - started) / 60, 1),
           "modules": results}  # fmt: skip
    json_path = RESULTS / f"{date}.json"
    md_path = RESULTS / f"{date}.md"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(raw, indent=1) + "\n")
    os.replace(tmp, json_path)
    lines = [
        f"# Mutation testing, {date}",
        "",
        f"`python benchmarks/mutation.py` (mutmut 3, one worker, nice 19), {raw['minutes']} minutes of a "
        f"{budget:g}-minute budget. Score = killed / (mutants − equivalent); equivalent survivors are listed "
        "with their reason in `benchmarks/mutation_equivalent.md`.",
        "",
        "| module | mutants | killed | survived | no tests | equivalent | score | complete | minutes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results:
        score = "—" if r["score"] is None else f"{r['score']:.1f} %"
        lines.append(
            f"| `{r['module']}` | {r['mutants']} | {r['killed']} | {r['survived']} | {r['no_tests']} | "
            f"{r['equivalent']} | {score} | {'yes' if r['finished'] else 'no (budget)'} | "
            f"{r['seconds'] / 60:.1f} |"
        )
    for r in results:
        if not r["survivors"] and not r["stale_equivalents"]:
            continue
        lines += ["", f"## Survivors in `{r['module']}`", ""]
        if r["stale_equivalents"]:
            lines.append(
                f"Listed as equivalent but the mutant changed (re-judge): {', '.join(r['stale_equivalents'])}"
            )
            lines.append("")
        for s in r["survivors"]:
            lines += [f"- `{s['name']}` ({s['status']}): `{s['line']}`"]
    md_tmp = md_path.with_suffix(".md.tmp")
    md_tmp.write_text("\n".join(lines) + "\n")
    os.replace(md_tmp, md_path)
    return md_path


def rescore(date: str) -> int:
    """Re-count a finished report's survivors against the (edited) equivalents file."""
    path = RESULTS / f"{date}.json"
    if not path.is_file():
        print(f"mutation.py: error: no report {path.relative_to(ROOT)} to rescore", file=sys.stderr)
        return 2
    raw = json.loads(path.read_text())
    equivalent = equivalents()
    for r in raw["modules"]:
        kept, stale = [], []
        for s in r["survivors"]:
            if equivalent.get(s["name"]) == s["line"]:
                r["equivalent"] += 1
                r["survived" if s["status"] == "survived" else "no_tests"] -= 1
            else:
                if s["name"] in equivalent:
                    stale.append(s["name"])
                kept.append(s)
        r["survivors"], r["stale_equivalents"] = kept, stale
        judged = r["killed"] + r["survived"] + r["no_tests"] + r["other"]
        r["score"] = round(100 * r["killed"] / judged, 1) if judged else None
    write_report(raw["modules"], date, raw["budget_minutes"], time.monotonic() - raw["minutes"] * 60)
    print(f"rescored {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


def score_table(names: list[str], before: list[str]) -> str:
    """One row per module of the reports ``names`` (a later report wins for a module), in pyproject order,
    with the score of the reports ``before`` beside it: the docs' table, made from committed raw output."""

    def by_module(reports: list[str]) -> dict[str, tuple[str, dict]]:
        found = {}
        for name in reports:
            path = RESULTS / f"{name}.json"
            if not path.is_file():
                raise SystemExit(f"mutation.py: error: no report {path.relative_to(ROOT)}")
            for r in json.loads(path.read_text())["modules"]:
                found[r["module"]] = (name, r)
        return found

    after, earlier = by_module(names), by_module(before)
    pct = lambda r: "—" if r["score"] is None else f"{r['score']:.1f} %"  # noqa: E731
    rows = [
        "| module | report | mutants | killed | survived | no tests | equivalent | score | complete | before |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for module in [m for m in modules_from_pyproject() if m in after]:
        name, r = after[module]
        was = f"{pct(earlier[module][1])} ({earlier[module][0]})" if module in earlier else "—"
        rows.append(
            f"| `{module}` | `{name}` | {r['mutants']} | {r['killed']} | {r['survived']} | {r['no_tests']} | "
            f"{r['equivalent']} | {pct(r)} | {'yes' if r['finished'] else 'no'} | {was} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="module files to run (default: all in pyproject.toml)")
    parser.add_argument("--budget", type=float, default=100.0, help="minutes for the whole run (default 100)")
    parser.add_argument("--date", default=dt.date.today().isoformat(), help="report name (default: today)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (to inspect mutants)")
    parser.add_argument("--rescore", action="store_true",
                        help="run nothing: re-judge the report of --date against the equivalents file")  # fmt: skip
    parser.add_argument("--table", nargs="+", metavar="REPORT",
                        help="run nothing: print the score table of these reports (names under benchmarks/results/mutation)")  # fmt: skip
    parser.add_argument("--before", nargs="*", default=[], metavar="REPORT",
                        help="with --table: reports whose scores fill the 'before' column")  # fmt: skip
    args = parser.parse_args(argv)
    if args.table:
        print(score_table(args.table, args.before))
        return 0
    if args.rescore:
        return rescore(args.date)
    configured = modules_from_pyproject()
    chosen = args.modules or list(configured)
    for module in chosen:
        if module not in configured:
            print(f"mutation.py: error: {module} is not in [tool.axf.mutation.modules]", file=sys.stderr)
            return 2
    try:
        import mutmut  # noqa: F401
    except ImportError:
        print("mutation.py: error: mutmut is not installed (pip install 'mutmut>=3.8,<4')", file=sys.stderr)
        return 2
    started = time.monotonic()
    previous = RESULTS / f"{args.date}.json"
    results = (
        {r["module"]: r for r in json.loads(previous.read_text())["modules"]} if previous.is_file() else {}
    )
    equivalent = equivalents()
    for i, module in enumerate(chosen):
        left = args.budget * 60 - (time.monotonic() - started)
        if left < 60:
            print(f"{module}: no time left in the budget, unmeasured", file=sys.stderr)
            continue
        # share what is left fairly among the modules still to run, but let a module use spare time
        share = max(left / (len(chosen) - i), min(left, 600))
        r = measure(module, configured[module], share, equivalent, args.keep)
        results[module] = r
        print(f"{module}: {r['killed']}/{r['mutants']} killed, {r['survived']} survived, {r['no_tests']} untested, "
              f"{r['equivalent']} equivalent, score {r['score']} %, {r['seconds'] / 60:.1f} min"
              + ("" if r["finished"] else " (incomplete)"), file=sys.stderr)  # fmt: skip
        if r["log_tail"]:
            print(r["log_tail"], file=sys.stderr)
        order = [m for m in configured if m in results]
        path = write_report([results[m] for m in order], args.date, args.budget, started)
    print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
