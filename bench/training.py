"""Training cost and forecast accuracy of each model type on one dataset.

Trains xgboost, lstm, gnn, then the ensemble of those three, each in its own process (so that
peak memory is the training's own), on a fresh SQLite MLflow store, exactly as a worker does
(``run_training``: load, features, train, evaluate, log, register). Writes
``bench/results/training_<label>.json`` with wall time, peak memory and test rmse at +1/+6/+24 h
next to the persistence baseline computed on the same test rows. ``--target-transform log1p``
trains every model in log space (``TrainConfig.extra["target_transform"]``; the ensemble then
combines those members); the JSON records it.

Usage::

    python -m bench.training --data synthetic --label synthetic
    python -m bench.training --data beijing:../shared/data/beijing-multisite --label beijing
    python -m bench.training --data beijing:../shared/data/beijing-multisite --label beijing_log1p \
        --target-transform log1p
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TYPES = ("xgboost", "lstm", "gnn")


def _train(model_type: str, spec: str, uri: str, members: list[dict[str, Any]], out: Any,
           transform: str = "") -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from aqimodels.training.core import EnsembleMemberRef, Finished, TrainConfig, TrainJob
    from aqimodels.training.runner import run_training

    config = TrainConfig(extra={"target_transform": transform} if transform else {})
    job = TrainJob(job_id=f"bench-{model_type}", model_type=model_type, dataset=spec, config=config,
                   ensemble_members=tuple(EnsembleMemberRef(**m) for m in members))
    start = time.perf_counter()
    epochs = 0
    finished = None
    for ev in run_training(job, threading.Event(), tracking_uri=uri):
        if type(ev).__name__ == "EpochFinished":
            epochs += 1
        if isinstance(ev, Finished):
            finished = ev
    assert finished is not None
    out.put({"model_type": model_type, "wall_seconds": time.perf_counter() - start,
             "training_seconds": finished.training_seconds, "steps": epochs, "version": finished.version,
             "model_uri": finished.model_uri, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "metrics": finished.metrics})


def run(spec: str, label: str, transform: str = "") -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="aqimodels-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        members: list[dict[str, Any]] = []
        for model_type in (*TYPES, "ensemble"):
            q = ctx.Queue()
            proc = ctx.Process(target=_train, args=(model_type, spec, uri, members if model_type == "ensemble" else [], q, transform))
            proc.start()
            while True:
                try:
                    result = q.get(timeout=5)
                    break
                except queue.Empty:
                    if not proc.is_alive():
                        raise RuntimeError(f"training {model_type} failed (exit code {proc.exitcode})") from None
            proc.join()
            results.append(result)
            if model_type in TYPES:
                members.append({"model_type": model_type, "model_name": f"aqi_predictor_{model_type}",
                                "version": result["version"], "model_uri": result["model_uri"]})
            m = result["metrics"]
            print(f"{model_type:9s} {result['wall_seconds']:7.1f} s  peak {result['peak_rss_mb']:6.0f} MB  "
                  + "  ".join(f"+{h}h rmse {m.get(f'rmse_h{h}', float('nan')):6.2f} "
                              f"(persistence {m.get(f'baseline_rmse_h{h}', float('nan')):6.2f})" for h in (1, 6, 24)),
                  flush=True)
    report = {"name": f"training_{label}", "dataset": spec, "target_transform": transform or "none", "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": results,
        "total_wall_seconds": sum(r["wall_seconds"] for r in results)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"training_{label}.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--label", default="synthetic")
    parser.add_argument("--target-transform", default="", choices=("", "none", "log1p"),
                        help="train every model in this space (default: the trainers' default, none)")
    args = parser.parse_args()
    report = run(args.data, args.label, args.target_transform)
    print(f"total {report['total_wall_seconds']:.0f} s -> bench/results/training_{args.label}.json")


if __name__ == "__main__":
    main()
