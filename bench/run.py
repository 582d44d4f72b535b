"""``make bench``: runs the benchmark sections, writes bench/results/<section>.json and BENCHMARKS.md.

Sections: ``rpc`` (registry RPCs against MLflow's paths and the gRPC ceiling), ``streams`` (relay
latency and throughput, 50 watchers), ``process`` (start time and memory), ``cli`` (``aqimodels
status`` start against the import of grpc and the registry module), ``scale`` (start to
SERVING at 4 x 10,000, GetStatus at 100 models, idle CPU at 400 models, memory per version,
about 14 minutes), ``durability``
(takeover of a job by another replica after kill -9 and SIGTERM, events lost, the lease
heartbeat's cost; about 3 minutes), ``training`` (reads
bench/results/training_*.json after rerunning the synthetic one, ~1 min, and the Beijing one when
the data is present, ~7 min), ``dashboard`` (pages in Chromium, 1 vs 50 SSE clients, ~2 min). Every section builds its own data in a
temporary folder. Usage::

    python -m bench.run                       # everything (about 25-30 minutes on 2 cores)
    python -m bench.run --sections scale,report   # section 5 only (about 14 minutes)
    python -m bench.run --sections rpc,report --runs 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

from bench import common  # noqa: E402

SECTIONS = ("rpc", "streams", "process", "cli", "scale", "durability", "training", "resilience", "dashboard", "report")
BEIJING = common.BEIJING


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
        if "rpc" in wanted:
            from bench import rpc

            print("== 1. registry RPCs", flush=True)
            t0 = time.perf_counter()
            res = rpc.run(tmp / "rpc", tuple(int(x) for x in args.sizes.split(",")), args.runs, args.seconds,
                          with_rest=not args.no_rest)
            print(f"   wrote {common.write_result('rpc', {**res, 'section_seconds': time.perf_counter() - t0})}")
        if "streams" in wanted:
            from bench import streams

            print("== 2. streams", flush=True)
            t0 = time.perf_counter()
            res = streams.run(tmp / "streams", args.runs)
            print(f"   wrote {common.write_result('streams', {**res, 'section_seconds': time.perf_counter() - t0})}")
        if "process" in wanted:
            from bench import process

            print("== 3. process costs", flush=True)
            t0 = time.perf_counter()
            res = process.run(tmp / "process", args.runs)
            print(f"   wrote {common.write_result('process', {**res, 'section_seconds': time.perf_counter() - t0})}")
        if "scale" in wanted:
            from bench import scale

            print("== 5. scale", flush=True)
            t0 = time.perf_counter()
            res = scale.run(tmp / "scale", args.runs, args.seconds, with_rest=not args.no_rest)
            print(f"   wrote {common.write_result('scale', {**res, 'section_seconds': time.perf_counter() - t0})}")
        if "durability" in wanted:
            from bench import durability

            print("== 6. durable jobs", flush=True)
            t0 = time.perf_counter()
            res = durability.run(tmp / "durability", args.runs, args.lease_seconds)
            print(f"   wrote {common.write_result('durability', {**res, 'section_seconds': time.perf_counter() - t0})}")
        if "dashboard" in wanted:
            from bench import dashboard

            print("== 8. dashboard", flush=True)
            t0 = time.perf_counter()
            res = dashboard.run(tmp / "dashboard", args.runs)
            print(f"   wrote {common.write_result('dashboard', {**res, 'section_seconds': time.perf_counter() - t0})}")
        if "cli" in wanted:
            from bench import cli_start

            print("== 3b. CLI start-up", flush=True)
            t0 = time.perf_counter()
            res = cli_start.run(tmp / "cli", max(args.runs, 7))
            print(f"   wrote {common.write_result('cli_start', {**res, 'section_seconds': time.perf_counter() - t0})}")
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
        if "resilience" in wanted:
            from bench import resilience

            print("== 5. failure-safe changes and bounded waits", flush=True)
            t0 = time.perf_counter()
            res = resilience.run(tmp / "resilience", args.runs)
            print(f"   wrote {common.write_result('resilience', {**res, 'section_seconds': time.perf_counter() - t0})}")
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
