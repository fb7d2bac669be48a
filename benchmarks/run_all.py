"""Run every benchmark, one after the other, and collect their JSON and markdown in one folder.

Every script in benchmarks/ whose name does not start with ``_`` (helpers) is a benchmark,
except ``common.py`` and this file; new ones are picked up without being listed here. Each
runs as ``python benchmarks/NAME.py --json OUT/NAME.json`` (plus ``--quick`` with
``--quick``, when the script takes it; see QUICK_ARGS for the ones that do not), with its
stdout in OUT/NAME.out and its stderr in OUT/NAME.log. A benchmark that fails or runs past
``--timeout`` is recorded as such and the rest still run.

OUT/results.json holds, per benchmark, its command, status, seconds, the load before and
after, and its JSON; OUT/results.md holds the same with each benchmark's markdown tables,
ready to be quoted in docs/.

    .venv/bin/python benchmarks/run_all.py                   # everything: about an hour on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick           # smoke run of everything
    .venv/bin/python benchmarks/run_all.py --only exchange,tta,overhead --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import BENCH_DIR, REPO, code_version, command_line, machine_info, python_cmd

log = logging.getLogger(__name__)

NOT_BENCHMARKS = {"common", "run_all"}
# Run these first, in this order (cheap and fundamental first); the rest alphabetically.
ORDER = ("exchange", "baselines", "tta", "straggler", "overhead", "startup", "memory",
         "checkpoint_stall")  # fmt: skip
# Smoke-run arguments for scripts that have no --quick.
QUICK_ARGS = {"checkpoint_stall": ["--steps", "300"]}


@dataclass(frozen=True)
class Bench:
    name: str  # the script's stem, also the stem of its output files
    script: Path


def discover() -> list[Bench]:
    found = {
        p.stem: Bench(p.stem, p)
        for p in sorted(BENCH_DIR.glob("*.py"))
        if not p.stem.startswith("_") and p.stem not in NOT_BENCHMARKS
    }
    first = [found.pop(name) for name in ORDER if name in found]
    return first + sorted(found.values(), key=lambda b: b.name)


def takes_quick(bench: Bench) -> bool:
    """Whether the script's --help lists --quick (scripts without it get QUICK_ARGS)."""
    try:
        out = subprocess.run(
            [*python_cmd(), str(bench.script), "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return False
    return "--quick" in out.stdout


def command(bench: Bench, out: Path, quick: bool) -> list[str]:
    argv = [*python_cmd(), str(bench.script), "--json", str(out / f"{bench.name}.json")]
    if quick:
        argv += ["--quick"] if takes_quick(bench) else QUICK_ARGS.get(bench.name, [])
    return argv


def split_output(stdout: str) -> str:
    """A benchmark prints its JSON object first, then markdown tables: return the tables."""
    text = stdout.lstrip()
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return stdout.strip()
    return text[end:].strip()


def run_one(bench: Bench, out: Path, quick: bool, timeout: float) -> dict[str, Any]:
    argv = command(bench, out, quick)
    record: dict[str, Any] = {
        "command": " ".join([Path(argv[0]).name, *argv[1:]]).replace(str(REPO) + "/", ""),
        "load_before": os.getloadavg()[0],
        "commit": code_version(),
    }
    log.info("%s: %s (load %.1f)", bench.name, record["command"], record["load_before"])
    t0 = time.monotonic()
    with open(out / f"{bench.name}.out", "w") as so, open(out / f"{bench.name}.log", "w") as se:
        try:
            proc = subprocess.run(argv, cwd=REPO, stdout=so, stderr=se, timeout=timeout)
            record["status"] = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
        except subprocess.TimeoutExpired:
            record["status"] = f"timed out after {timeout:.0f} s"
    record["seconds"] = round(time.monotonic() - t0, 1)
    record["load_after"] = os.getloadavg()[0]
    record["commit_after"] = code_version()
    record["tables"] = split_output((out / f"{bench.name}.out").read_text())
    json_path = out / f"{bench.name}.json"
    record["result"] = json.loads(json_path.read_text()) if json_path.exists() else None
    if record["status"] != "ok":
        tail = (out / f"{bench.name}.log").read_text().strip().splitlines()[-3:]
        record["error"] = " | ".join(tail)
        log.warning("%s: %s: %s", bench.name, record["status"], record["error"])
    return record


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{results['command']}` at {m['commit']}. Date {m['date']}, host {m['host']}, "
        f"{m['cpus']} CPUs "
        f"({m['cpu_model']}), Python {m['python']}. Load at start {m['loadavg_at_start'][0]:.1f}.",
        "",
    ]
    for name, r in results["benchmarks"].items():
        lines += [
            f"## {name}",
            "",
            f"`{r['command']}`: {r['status']}, {r['seconds']:.0f} s, "
            f"load {r['load_before']:.1f} before and {r['load_after']:.1f} after, "
            f"code {r['commit']}"
            + (f" (then {r['commit_after']})" if r["commit_after"] != r["commit"] else "")
            + ".",
            "",
        ]
        if r.get("error"):
            lines += ["```", r["error"], "```", ""]
        if r["tables"]:
            lines += [r["tables"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run of each")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names")
    parser.add_argument("--out", type=Path, default=None, help="output folder (runs/bench-DATE)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    benches = discover()
    names = [b.name for b in benches]
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    unknown = sorted(set(only + skip) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; there are: {', '.join(names)}")
    benches = [b for b in benches if (not only or b.name in only) and b.name not in skip]
    out = (args.out or REPO / "runs" / time.strftime("bench-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": command_line(),
        "machine": machine_info(),
        "benchmarks": {},
    }
    for bench in benches:
        results["benchmarks"][bench.name] = run_one(bench, out, args.quick, args.timeout)
        write(out, results)  # after each one, so an interrupted run keeps what it has
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    write(out, results)
    failed = [n for n, r in results["benchmarks"].items() if r["status"] != "ok"]
    print(f"results: {out / 'results.md'}, {out / 'results.json'}")
    if failed:
        print(f"not ok: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def write(out: Path, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")


if __name__ == "__main__":
    main()
