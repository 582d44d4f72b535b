"""Builds benchmark registries: M models (4 by default, up to hundreds) x N versions with
realistic finished runs and metrics.

MLflow's schema is created by MLflow itself (a migrated SQLite file), then the rows are written
with plain SQL inserts in one transaction: about three orders of magnitude faster than the
MlflowClient path (one create_run, log_batch, set_terminated and create_model_version per
version), whose rate is measured on a small sample for comparison. The result reads back
through MlflowClient like any other store (checked after each build).
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

MODELS = ("aqi_predictor_xgboost", "aqi_predictor_lstm", "aqi_predictor_gnn", "aqi_predictor_ensemble")
EXPERIMENT = "aqi-predictor"
POLLUTANTS = ("pm25", "pm10", "no2", "o3", "so2", "co")
KINDS = ("xgboost", "lstm", "gnn", "ensemble")


def model_names(count: int = 4) -> tuple[str, ...]:
    """The four benchmark models, or ``count`` models named as a platform team would host them:
    one per pollutant, region and model type (``aqi_pm25_r007_lstm``)."""
    if count == len(MODELS):
        return MODELS
    names = [f"aqi_{p}_r{r:03d}_{k}" for r in range(1000) for p in POLLUTANTS for k in KINDS]
    return tuple(sorted(names[:count]))

_MIGRATE = (
    "import sys; from mlflow.tracking import MlflowClient; c = MlflowClient(tracking_uri=sys.argv[1]); "
    "c.search_experiments(); c.create_experiment(sys.argv[2], artifact_location=sys.argv[3]); "
    "from aqimodels.server.db import Database; d = Database(sys.argv[1]); d.create_tables(); d.engine.dispose()")


def migrated_template(folder: Path) -> Path:
    """A migrated MLflow + aqimodels SQLite file with the experiment created."""
    path = folder / "template.db"
    if not path.exists():
        subprocess.run([sys.executable, "-c", _MIGRATE, f"sqlite:///{path}", EXPERIMENT, str(folder / "artifacts")],
                       check=True, capture_output=True, timeout=300)
    return path


def realistic_metrics(rng: random.Random) -> dict[str, float]:
    rmse = 18.0 + rng.random() * 12.0
    base = 33.0 + rng.random() * 3
    out = {"rmse": rmse, "mae": rmse * 0.68, "r2": max(0.0, 0.92 - rmse / 100), "accuracy": 0.5 + rng.random() * 0.3,
           "aqi_accuracy": 0.6 + rng.random() * 0.3, "baseline_rmse": base, "skill": 1 - rmse / base,
           "training_seconds": 20 + rng.random() * 40, "peak_memory_mb": 400 + rng.random() * 300,
           "inference_latency_ms": 5 + rng.random() * 20, "data_rows": 420768.0, "epochs_run": float(rng.randint(5, 60))}
    for h, f in ((1, 0.45), (6, 0.9), (24, 1.3)):
        out[f"rmse_h{h}"] = rmse * f
        out[f"mae_h{h}"] = rmse * f * 0.68
        out[f"r2_h{h}"] = max(0.0, 0.95 - rmse * f / 100)
        out[f"accuracy_h{h}"] = max(0.0, 0.95 - 0.1 * f - rng.random() * 0.1)
        out[f"baseline_rmse_h{h}"] = base * f * 1.1
    return out


def build_sql(path: Path, versions_per_model: int, folder: Path, seed: int = 7, models: int = 4) -> dict[str, Any]:
    """Copies the template to ``path`` and inserts ``models`` x ``versions_per_model`` versions; returns timings."""
    template = migrated_template(folder)
    shutil.copy(template, path)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    con = sqlite3.connect(path)
    con.execute("PRAGMA synchronous=OFF")
    con.execute("PRAGMA journal_mode=MEMORY")
    exp_id = con.execute("SELECT experiment_id FROM experiments WHERE name=?", (EXPERIMENT,)).fetchone()[0]
    art = con.execute("SELECT artifact_location FROM experiments WHERE experiment_id=?", (exp_id,)).fetchone()[0]
    runs, metrics, latest, params, tags, mvs, mv_tags, aliases, model_rows = [], [], [], [], [], [], [], [], []
    names = model_names(models)
    now = int(time.time() * 1000) - versions_per_model * len(names) * 60_000
    for name in names:
        kind = name.rsplit("_", 1)[1]
        model_rows.append((name, now, now, f"PM2.5 forecaster ({kind})", "default"))
        production = max(1, versions_per_model - 5)
        staging = versions_per_model
        for v in range(1, versions_per_model + 1):
            run_id = uuid.UUID(int=rng.getrandbits(128)).hex
            start = now + v * 60_000
            end = start + 45_000
            runs.append((run_id, f"{kind}-{v}", "LOCAL", "aqimodels-worker", "", "aqimodels", "FINISHED", start, end,
                         "", "active", f"{art}/{run_id}/artifacts", exp_id))
            for k, val in realistic_metrics(rng).items():
                metrics.append((k, val, end, run_id, 0, 0))
                latest.append((k, val, end, 0, 0, run_id))
            for k, val in (("model_type", kind), ("window_hours", "24"), ("learning_rate", "0.001"),
                           ("max_epochs", "60"), ("dataset", "beijing"), ("seed", str(v))):
                params.append((k, val, run_id))
            for k, val in (("mlflow.runName", f"{kind}-{v}"), ("mlflow.user", "aqimodels"),
                           ("mlflow.source.type", "LOCAL"), ("aqimodels.job_id", uuid.UUID(int=v).hex[:12]),
                           ("aqimodels.model_type", kind)):
                tags.append((k, val, run_id))
            source = f"models:/m-{run_id}"
            mvs.append((name, v, start + 50_000, start + 50_000, "", "aqimodels", "None", source, run_id, "READY",
                        "", "", source, "default"))
            mv_tags.append(("aqimodels.model_type", kind, name, v, "default"))
            if v < production and v % 10 == 0:
                mv_tags.append(("aqimodels.archived", "true", name, v, "default"))
        aliases.append(("production", production, name, "default"))
        if staging != production:
            aliases.append(("staging", staging, name, "default"))
    with con:
        con.executemany("INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status,"
                        " start_time, end_time, source_version, lifecycle_stage, artifact_uri, experiment_id)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", runs)
        con.executemany('INSERT INTO metrics ("key", value, timestamp, run_uuid, step, is_nan) VALUES (?,?,?,?,?,?)',
                        metrics)
        con.executemany('INSERT INTO latest_metrics ("key", value, timestamp, step, is_nan, run_uuid)'
                        ' VALUES (?,?,?,?,?,?)', latest)
        con.executemany('INSERT INTO params ("key", value, run_uuid) VALUES (?,?,?)', params)
        con.executemany('INSERT INTO tags ("key", value, run_uuid) VALUES (?,?,?)', tags)
        con.executemany("INSERT INTO registered_models (name, creation_time, last_updated_time, description, workspace)"
                        " VALUES (?,?,?,?,?)", model_rows)
        con.executemany("INSERT INTO model_versions (name, version, creation_time, last_updated_time, description,"
                        " user_id, current_stage, source, run_id, status, status_message, run_link, storage_location,"
                        " workspace) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", mvs)
        con.executemany('INSERT INTO model_version_tags ("key", value, name, version, workspace) VALUES (?,?,?,?,?)',
                        mv_tags)
        con.executemany("INSERT INTO registered_model_aliases (alias, version, name, workspace) VALUES (?,?,?,?)",
                        aliases)
    con.execute("ANALYZE")
    con.close()
    seconds = time.perf_counter() - t0
    n = versions_per_model * len(names)
    return {"models": len(names), "versions": n, "seconds": seconds, "versions_per_second": n / seconds,
            "metric_rows": len(metrics),
            "path": str(path)}


def verify(uri: str, versions_per_model: int, models: int = 4) -> None:
    """Reads the built store back through MlflowClient (aliases, versions, run metrics; at most
    eight models of a large registry, first and last by name among them)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    names = model_names(models)
    for name in (names if len(names) <= 8 else names[:4] + names[-4:]):
        prod = c.get_model_version_by_alias(name, "production")
        run = c.get_run(prod.run_id)
        assert "rmse_h24" in run.data.metrics and run.info.status == "FINISHED", name
        top = c.search_model_versions(f"name='{name}'", max_results=1, order_by=["version_number DESC"])
        assert int(top[0].version) == versions_per_model, (name, top[0].version)


def build_with_client(folder: Path, versions_per_model: int) -> dict[str, Any]:
    """The MlflowClient path (``MlflowModelStore.create_version``: run, metrics, finish, register)."""
    from aqimodels.server.mlflow_store import MlflowModelStore

    path = folder / "client-built.db"
    shutil.copy(migrated_template(folder), path)
    store = MlflowModelStore(f"sqlite:///{path}")
    rng = random.Random(3)
    store.create_version(MODELS[0], realistic_metrics(rng), experiment_name=EXPERIMENT)  # warm-up
    t0 = time.perf_counter()
    n = 0
    for name in MODELS:
        for _ in range(versions_per_model):
            store.create_version(name, realistic_metrics(rng), {"aqimodels.model_type": name.rsplit("_", 1)[1]},
                                 experiment_name=EXPERIMENT)
            n += 1
    seconds = time.perf_counter() - t0
    return {"versions": n, "seconds": seconds, "versions_per_second": n / seconds}
