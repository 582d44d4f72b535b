"""``make bench``: runs the benchmark sections, writes bench/results/<section>.json and BENCHMARKS.md.

Sections: ``rpc`` (registry RPCs against MLflow's paths and the gRPC ceiling), ``streams`` (relay
latency and throughput, 50 watchers), ``process`` (start time and memory), ``cli`` (``aqimodels
status`` start against the import of grpc and the registry module), ``scale`` (start to
SERVING at 4 x 10,000, GetStatus at 100 models, idle CPU at 400 models, memory per version,
about 14 minutes), ``durability``
(takeover of a job by another replica after kill -9 and SIGTERM, events lost, the lease
heartbeat's cost; about 3 minutes), ``training`` (reads
bench/results/training_*.json after rerunning the synthetic one, ~1 min, and the Beijing one when
the data is present, ~7 min), ``dashboard`` (pages in Chromium, 1 vs 50 SSE clients, ~2 min), ``events`` (commit -> watcher
latency on the same and another replica, replay rate; ~1 min), ``webhooks`` (promotion latency with no, a healthy
and a hanging webhook receiver; delivery latency; ~2 min). Every section builds its own data in a
temporary folder. Usage::

    python -m bench.run                       # everything (about 25-30 minutes on 2 cores)
    python -m bench.run --sections scale,report   # section 5 only (about 14 minutes)
    python -m bench.run --sections rpc,report --runs 2
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

from bench import common

SECTIONS = ("rpc", "streams", "process", "cli", "scale", "durability", "training", "resilience", "dashboard", "events",
            "webhooks", "report")
BEIJING = common.BEIJING


# Sections that build their data under a temporary folder and write one result file:
# name -> (heading, result file, run(folder, args)). Run in this order, then training and report.
_TIMED: dict[str, tuple[str, str, Callable[[Path, argparse.Namespace], dict[str, Any]]]] = {
    "rpc": ("1. registry RPCs", "rpc", lambda d, a: _module("rpc").run(
        d, tuple(int(x) for x in a.sizes.split(",")), a.runs, a.seconds, with_rest=not a.no_rest)),
    "streams": ("2. streams", "streams", lambda d, a: _module("streams").run(d, a.runs)),
    "process": ("3. process costs", "process", lambda d, a: _module("process").run(d, a.runs)),
    "cli": ("3b. CLI start-up", "cli_start", lambda d, a: _module("cli_start").run(d, max(a.runs, 7))),
    "scale": ("5. scale", "scale", lambda d, a: _module("scale").run(d, a.runs, a.seconds,
                                                                      with_rest=not a.no_rest)),
    "resilience": ("6. failure-safe changes and bounded waits", "resilience",
                   lambda d, a: _module("resilience").run(d, a.runs)),
    "durability": ("7. durable jobs", "durability",
                   lambda d, a: _module("durability").run(d, a.runs, a.lease_seconds)),
    "dashboard": ("8. dashboard", "dashboard", lambda d, a: _module("dashboard").run(d, a.runs)),
    "events": ("9. registry events", "events", lambda d, a: _module("events").run(d, a.runs)),
    "webhooks": ("10. webhooks", "webhooks", lambda d, a: _module("webhooks").run(d, a.runs)),
}


def _module(name: str) -> Any:
    return importlib.import_module(f"bench.{name}")  # each section's imports only when it runs


def _run_timed(name: str, tmp: Path, args: argparse.Namespace) -> None:
    heading, result, run = _TIMED[name]
    print(f"== {heading}", flush=True)
    t0 = time.perf_counter()
    res = run(tmp / name, args)
    print(f"   wrote {common.write_result(result, {**res, 'section_seconds': time.perf_counter() - t0})}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--runs", type=int, default=3, help="repetitions of every figure")
    parser.add_argument("--seconds", type=float, default=1.5, help="window of one latency/throughput run")
    parser.add_argument("--sizes", default="100,1000,10000", help="versions per model of the built registries")
    parser.add_argument("--no-rest", action="store_true", help="skip the mlflow server baselines")
    parser.add_argument("--skip-synthetic-training", action="store_true", help="reuse training_synthetic.json")
    parser.add_argument("--lease-seconds", type=float, default=15.0, help="job lease of the takeover runs")
    parser.add_argument("--reuse-beijing", action="store_true", help="reuse training_beijing.json (about 7 min)")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="aqimodels-bench-"))
    try:
        for name in _TIMED:
            if name in wanted:
                _run_timed(name, tmp, args)
        if "training" in wanted:
            from bench import report, training

            print("== 4. training", flush=True)
            if not args.skip_synthetic_training:
                training.run("synthetic", "synthetic")
            if not (args.reuse_beijing and (common.RESULTS / "training_beijing.json").exists()):
                if BEIJING.is_dir():
                    training.run(f"beijing:{BEIJING}", "beijing")
                else:
                    print(f"   Beijing data not found at {BEIJING}: skipped", flush=True)
            summary = {label: report.training_summary(label) for label in ("synthetic", "beijing")}
            print(f"   wrote {common.write_result('training', summary)}")
        if "report" in wanted:
            from bench import report

            out = common.ROOT / "BENCHMARKS.md"
            report.write_markdown(out)
            print(f"== wrote {out}")
        print(f"bench done in {(time.perf_counter() - started) / 60:.1f} min")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
