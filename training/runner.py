"""One training job from data to a registered MLflow model version, as a stream of events.

``run_training(job, stop, tracking_uri=...)`` does, in order:

1. load and validate the dataset and build the features: any problem raises
   ``InvalidArgumentError`` BEFORE an MLflow run exists;
2. get or create the experiment (artifacts under ``artifact_location``; for a
   ``sqlite:///dir/x.db`` store without one, ``dir/artifacts``, never ``./mlruns``) and create
   a run with ``MlflowClient`` (no fluent active-run state, so trainings can run in threads);
3. yield ``Started``, ``DataLoaded``, one ``EpochFinished`` per epoch/round (logged as
   ``train_loss``/``val_rmse`` at step=epoch), ``Evaluating``;
4. log test metrics (with the persistence baseline), timings, data size and fingerprint,
   convergence, peak memory, inference latency/throughput, the pipeline/feature JSON and the
   pyfunc model (a logged model, explicit signature and requirements);
5. only then register a version (``Registering``) and yield ``Finished``.

A set ``stop`` raises ``TrainingCancelled``: the run ends KILLED and nothing is registered.
Any other error ends the run FAILED, nothing registered, and is re-raised.

``peak_memory_mb`` is the process's peak resident set size (``ru_maxrss``), so with several
trainings in one process it is an upper bound for this one.
"""

from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import numpy as np
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.training.core import (
    HORIZON_HOURS,
    MODEL_TYPES,
    DataLoaded,
    EpochFinished,
    Evaluating,
    FeatureSet,
    Finished,
    ProgressEvent,
    Registering,
    Started,
    TrainingCancelled,
    TrainJob,
)
from aqimodels.training.data import AirQualityData, load_dataset
from aqimodels.training.evaluation import evaluate, masked_rmse
from aqimodels.training.features import FeaturePipeline, build_features, describe
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

LATENCY_REPEATS = 5


def default_artifact_location(tracking_uri: str) -> str | None:
    """``<dir of db>/artifacts`` for a ``sqlite:///path/x.db`` store, else None (server default)."""
    if tracking_uri.startswith("sqlite:///"):
        path = urlparse(tracking_uri).path
        if tracking_uri.startswith("sqlite:////"):
            path = "/" + path.lstrip("/")
        return os.path.join(os.path.dirname(os.path.abspath(path)), "artifacts")
    return None


def _check_artifact_root(client: MlflowClient, exp_id: str) -> None:
    """Before any training: a local artifact folder that cannot be written would fail only at the end."""
    from aqimodels.client.errors import FailedPreconditionError, quote
    from aqimodels.server.config import local_folder_problem

    location = client.get_experiment(exp_id).artifact_location or ""
    if location and (location.startswith("file:") or "://" not in location):
        problem = local_folder_problem(location)
        if problem:
            raise FailedPreconditionError(
                f"the artifact location {quote(location)} of experiment {exp_id} {problem}; nothing could be "
                "saved after training (fix the folder or set AQIMODELS_ARTIFACT_LOCATION for a new experiment)")


def _experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_location))
    except MlflowException:  # created concurrently
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


def _peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _check(stop: threading.Event) -> None:
    if stop.is_set():
        raise TrainingCancelled("training cancelled")


def _prepare(job: TrainJob) -> tuple[AirQualityData, FeatureSet, FeaturePipeline, list[Any]]:
    """Everything that can fail on bad input, before MLflow is touched."""
    if job.model_type not in MODEL_TYPES:
        raise InvalidArgumentError(
            f"unknown model type {job.model_type!r}; expected one of {', '.join(MODEL_TYPES)}", field="model_types"
        )
    members: list[Any] = []
    window = int(job.config.window_hours)
    if job.model_type == "ensemble":
        if not job.ensemble_members:
            raise InvalidArgumentError(
                "ensemble needs at least one trained member; retrain xgboost, lstm or gnn first", field="model_types"
            )
    elif window < 1 or window > 24 * 30:
        raise InvalidArgumentError(f"window_hours must be 1..720, got {window}", field="window_hours")
    data = load_dataset(job.dataset, start=job.start_time, end=job.end_time)
    if job.model_type == "ensemble":
        return data, None, None, members  # type: ignore[return-value]  # features after loading members
    fs, pipe = build_features(data, window=window, horizon=HORIZON_HOURS, stride=_stride(job))
    return data, fs, pipe, members


def _stride(job: TrainJob) -> int:
    raw = job.config.extra.get("stride", "1") or "1"
    try:
        stride = int(raw)
    except ValueError:
        raise InvalidArgumentError(f"stride must be an integer, got {raw!r}", field="config") from None
    if stride < 1:
        raise InvalidArgumentError(f"stride must be at least 1, got {stride}", field="config")
    return stride


def _load_member(uri: str, tracking_uri: str) -> Any:
    import mlflow.pyfunc
    from mlflow.artifacts import download_artifacts

    from mlflow.tracking import MlflowClient

    try:
        # Resolve models:/ URIs against this job's store, never the process-wide registry URI.
        if uri.startswith("models:/"):
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            ref = uri[len("models:/"):]
            if "@" in ref:
                name, alias = ref.split("@", 1)
                version = client.get_model_version_by_alias(name, alias).version
            else:
                name, version = ref.rsplit("/", 1)
            uri = client.get_model_version_download_uri(name, str(version))
        local = download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri)
        return mlflow.pyfunc.load_model(local).unwrap_python_model()
    except MlflowException as e:
        raise InvalidArgumentError(f"cannot load ensemble member {uri}: {e.message}", field="model_types") from None


def _ensemble_features(job: TrainJob, data: AirQualityData, tracking_uri: str) -> tuple[FeatureSet, FeaturePipeline, list[Any], list[str]]:
    from aqimodels.training.model import AqiForecastModel

    members, names = [], []
    for ref in job.ensemble_members:
        m = _load_member(ref.model_uri, tracking_uri)
        if not isinstance(m, AqiForecastModel):
            raise InvalidArgumentError(f"ensemble member {ref.model_uri} is not an AQI forecast model", field="model_types")
        members.append(m)
        name = ref.model_type
        names.append(name if name not in names else f"{name}_v{ref.version}")
    window = max(m.window for m in members)
    fs, pipe = build_features(data, window=window, horizon=HORIZON_HOURS, stride=_stride(job))
    return fs, pipe, members, names


def _align(pred: np.ndarray, times: np.ndarray, want: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(times, want)
    if np.any(idx >= len(times)) or not np.array_equal(times[np.minimum(idx, len(times) - 1)], want):
        raise RuntimeError("member predictions do not cover the requested origins")
    return pred[idx]


def run_training(
    job: TrainJob, stop: threading.Event, *, tracking_uri: str, artifact_location: str | None = None,
) -> Iterator[ProgressEvent]:
    """Train, log and register one model; see the module docstring."""
    t_start = time.monotonic()
    data, fs, pipe, _ = _prepare(job)
    members: list[Any] = []
    member_names: list[str] = []
    if job.model_type == "ensemble":
        fs, pipe, members, member_names = _ensemble_features(job, data, tracking_uri)
        trainer = None
    else:
        from aqimodels.training.trainers import get_trainer

        trainer = get_trainer(job.model_type)
    _check(stop)
    fingerprint = data.fingerprint()

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp_id = _experiment(client, job.experiment_name, artifact_location or default_artifact_location(tracking_uri))
    _check_artifact_root(client, exp_id)
    tags = {"job_id": job.job_id, "model_type": job.model_type, "data_fingerprint": fingerprint,
            "dataset": job.dataset or "synthetic", "mlflow.runName": f"{job.model_type}-{job.job_id}", **job.tags}
    run = client.create_run(exp_id, tags=tags)
    run_id = run.info.run_id
    status = "FAILED"
    try:
        total = len(members) if trainer is None else int(
            job.config.max_epochs or getattr(trainer, "default_max_epochs", 0) or _default_epochs(job.model_type))
        yield Started(run_id=run_id, experiment_id=exp_id, total_steps=total)
        sizes = {
            "data_rows": len(data.frame), "data_stations": len(fs.stations), "data_hours": data.n_hours,
            "train_samples": len(fs.train), "val_samples": len(fs.val), "test_samples": len(fs.test),
            "n_features": len(fs.feature_names),
        }
        params: dict[str, Any] = {
            "model_type": job.model_type, "window_hours": fs.window, "horizon_hours": fs.horizon,
            "dataset": job.dataset or "synthetic", "data_fingerprint": fingerprint, "seed": job.config.seed,
            "job_id": job.job_id, **sizes,
            **{f"extra_{k}": v for k, v in job.config.extra.items()},
        }
        for key in ("max_epochs", "learning_rate", "batch_size", "early_stopping_patience", "hidden_size"):
            v = getattr(job.config, key)
            if v is not None:
                params[key] = v
        yield DataLoaded(stations=len(fs.stations), hours=data.n_hours, train_samples=len(fs.train),
                         validation_samples=len(fs.val), test_samples=len(fs.test), fingerprint=fingerprint)

        t_train = time.monotonic()
        convergence: dict[str, float] = {}
        if trainer is not None:
            for ev in trainer.fit(fs, job.config, stop):
                client.log_batch(run_id, metrics=_epoch_metrics(ev), synchronous=True)
                yield ev
                _check(stop)
            _check(stop)
            if trainer.forecaster is None:
                raise RuntimeError(f"{job.model_type} trainer finished without a forecaster")
            convergence = dict(trainer.convergence)
            params.update({f"trainer_{k}": v for k, v in getattr(trainer, "params", {}).items()})
            from aqimodels.training.model import AqiForecastModel

            model: Any = AqiForecastModel(pipe, trainer.forecaster, job.model_type,
                                          metadata={"job_id": job.job_id, "data_fingerprint": fingerprint})
            test_pred = np.asarray(trainer.forecaster.predict(fs.test.x))
            forecaster: Any = trainer.forecaster
        else:
            model, test_pred, convergence = yield from _fit_ensemble(
                client, run_id, job, data, fs, members, member_names, stop)
            forecaster = None
        training_seconds = time.monotonic() - t_train
        _check(stop)

        yield Evaluating(test_samples=len(fs.test))
        metrics = evaluate(test_pred, fs.test.y, fs.test.last_pm25)
        latency_ms, throughput = _inference_speed(model, forecaster, fs, data)
        metrics.update({
            "training_seconds": training_seconds, "total_seconds": time.monotonic() - t_start,
            "peak_memory_mb": _peak_memory_mb(), "inference_latency_ms": latency_ms,
            "inference_throughput": throughput,
            **{k: float(v) for k, v in sizes.items()},
            **{k: float(v) for k, v in convergence.items()},
        })
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
        client.log_batch(run_id, params=_params(params), synchronous=True)
        client.log_batch(run_id, metrics=[_metric(k, v) for k, v in sorted(metrics.items())], synchronous=True)
        client.log_dict(run_id, pipe.to_dict(), "pipeline.json")
        client.log_dict(run_id, {**describe(fs), "data_fingerprint": fingerprint, "dataset": job.dataset,
                                 "data_rows": len(data.frame), "data_hours": data.n_hours}, "features.json")
        _check(stop)
        model_id, source = _log_model(client, exp_id, run_id, job, model)
        _check(stop)

        yield Registering(model_name=job.model_name)
        version = _register(client, job, source, run_id, model_id,
                            version_description(job, len(data.station_names), data.n_hours, metrics))
        status = "FINISHED"
        yield Finished(model_name=job.model_name, version=version, run_id=run_id,
                       model_uri=f"models:/{job.model_name}/{version}", metrics=metrics,
                       training_seconds=training_seconds)
    except (TrainingCancelled, GeneratorExit):
        status = "KILLED"
        raise
    finally:
        try:
            client.set_terminated(run_id, status=status)
        except MlflowException:  # pragma: no cover - the store went away; the original error matters
            pass


def _default_epochs(model_type: str) -> int:
    if model_type == "xgboost":
        from aqimodels.training.trainers.xgboost import DEFAULTS

        return int(DEFAULTS["max_epochs"])
    return 0


def _metric(key: str, value: float, step: int = 0) -> Any:
    from mlflow.entities import Metric

    return Metric(key=key, value=float(value), timestamp=int(time.time() * 1000), step=step)


def _epoch_metrics(ev: EpochFinished) -> list[Any]:
    prefix = f"{ev.member}_" if ev.member else ""
    out = [_metric(f"{prefix}val_rmse", ev.validation_rmse, ev.epoch)]
    if np.isfinite(ev.loss):
        out.append(_metric(f"{prefix}train_loss", ev.loss, ev.epoch))
    return out


def _params(params: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]


def _fit_ensemble(
    client: MlflowClient, run_id: str, job: TrainJob, data: AirQualityData, fs: FeatureSet,
    members: list[Any], names: list[str], stop: threading.Event,
) -> Iterator[EpochFinished]:  # returns (model, test_pred, convergence) via StopIteration
    from aqimodels.training.model import EnsembleForecastModel
    from aqimodels.training.trainers.ensemble import fit_horizon_weights

    t0 = time.monotonic()
    val_preds, test_preds = [], []
    for i, (m, name) in enumerate(zip(members, names), start=1):
        _check(stop)
        pred, times = m.predict_dataset(data)
        order = [m.stations.index(s) for s in fs.stations]
        pred = pred[:, order]
        pv, pt = _align(pred, times, fs.val.times), _align(pred, times, fs.test.times)
        val_preds.append(pv)
        test_preds.append(pt)
        rmse = masked_rmse(pv, fs.val.y)
        ev = EpochFinished(epoch=i, total_epochs=len(members), loss=float((rmse / fs.target_std) ** 2),
                           validation_rmse=rmse, member=name, elapsed_seconds=time.monotonic() - t0)
        client.log_batch(run_id, metrics=_epoch_metrics(ev), synchronous=True)
        yield ev
    _check(stop)
    weights = np.asarray(fit_horizon_weights(np.stack(val_preds), np.asarray(fs.val.y)), dtype=np.float64)
    logged = {f"weight_{n}": float(weights[i].mean()) for i, n in enumerate(names)}
    for h in (1, 6, 24):
        if h <= weights.shape[1]:
            logged.update({f"weight_{n}_h{h}": float(weights[i, h - 1]) for i, n in enumerate(names)})
    client.log_batch(run_id, params=_params({k: f"{v:.6f}" for k, v in logged.items()}),
                     metrics=[_metric(k, v) for k, v in logged.items()], synchronous=True)
    model = EnsembleForecastModel(members, weights, names, metadata={"job_id": job.job_id})
    test_pred = model.combine(np.stack(test_preds))
    val_rmse = masked_rmse(model.combine(np.stack(val_preds)), fs.val.y)
    convergence = {"epochs_run": float(len(members)), "best_epoch": float(len(members)),
                   "final_loss": float((val_rmse / fs.target_std) ** 2), "early_stopped": 0.0,
                   "val_rmse": val_rmse}
    return model, test_pred, convergence


def _inference_speed(model: Any, forecaster: Any, fs: FeatureSet, data: AirQualityData) -> tuple[float, float]:
    """(latency of one sample in ms, median of a few; throughput in samples/s on the test set)."""
    if forecaster is not None:
        one = np.ascontiguousarray(fs.test.x[-1:])
        batch = fs.test.x
        run_one, run_batch = (lambda: forecaster.predict(one)), (lambda: forecaster.predict(batch))
        n = len(batch)
    else:  # the ensemble: from raw data, every member's pipeline included
        tail = data.slice(start=fs.test.times[0] - np.timedelta64(model.window - 1, "h"))
        last = data.slice(start=fs.test.times[-1] - np.timedelta64(model.window - 1, "h"),
                          end=fs.test.times[-1] + np.timedelta64(1, "h"))
        run_one, run_batch = (lambda: model.predict(None, last.frame)), (lambda: model.predict_dataset(tail))
        n = len(fs.test)
    run_one()  # warm-up
    times = []
    for _ in range(LATENCY_REPEATS):
        t = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    run_batch()
    elapsed = max(time.perf_counter() - t, 1e-9)
    return float(np.median(times) * 1000), float(n / elapsed)


def _log_model(client: MlflowClient, exp_id: str, run_id: str, job: TrainJob, model: Any) -> tuple[str, str]:
    """Save the pyfunc model and log it as an MLflow 3 logged model of the run: (model_id, source)."""
    from aqimodels.training.model import save_pyfunc

    lm = client.create_logged_model(exp_id, name="model", source_run_id=run_id, model_type=job.model_type,
                                    tags={"job_id": job.job_id, "model_type": job.model_type})
    try:
        with tempfile.TemporaryDirectory(prefix="aqimodel-") as tmp:
            path = os.path.join(tmp, "model")
            save_pyfunc(model, path)
            _stamp_model_id(path, lm.model_id, run_id)
            client.log_model_artifacts(lm.model_id, path)
    except BaseException:
        client.finalize_logged_model(lm.model_id, "FAILED")
        raise
    client.finalize_logged_model(lm.model_id, "READY")
    # The artifact location, not "models:/<model_id>": the registry resolves the latter through
    # the process-global tracking URI, which is not ours to rely on (threads, several stores).
    return lm.model_id, lm.artifact_location


def _stamp_model_id(path: str, model_id: str, run_id: str) -> None:
    """Record the logged model's id and run in its MLmodel file (as ``log_model`` would)."""
    from mlflow.models import Model

    mlmodel = os.path.join(path, "MLmodel")
    m = Model.load(mlmodel)
    m.model_id = model_id
    m.run_id = run_id
    m.artifact_path = "model"
    m.save(mlmodel)


def model_description(model_type: str) -> str:
    """The registered model's MLflow description (shown in MLflow's UI)."""
    return (f"aqimodels {model_type} forecaster of PM2.5 and AQI for every station, 1 to 24 hours ahead. "
            "Versions are trained by aqimodels retrain jobs; each version's description names its data and "
            "test metrics. Stages: the 'production' and 'staging' aliases (aqimodels promote / rollback).")


def version_description(job: TrainJob, stations: int, hours: int, metrics: dict[str, float]) -> str:
    """A version's MLflow description: what it is, the data it saw, its headline test metrics."""
    def m(key: str) -> str:
        return f"{metrics[key]:.2f}" if key in metrics else "n/a"

    ran = int(metrics.get("epochs_run", 0))
    stopped = ", stopped early" if metrics.get("early_stopped") else ""
    return (f"{job.model_type} trained by aqimodels job {job.job_id} on {job.dataset or 'synthetic'} "
            f"({stations} stations, {hours} hours). Test rmse {m('rmse')} µg/m³ (persistence {m('baseline_rmse')}), "
            f"mae {m('mae')}, rmse at +1/+6/+24 h {m('rmse_h1')}/{m('rmse_h6')}/{m('rmse_h24')}"
            + (f"; {ran} epochs{stopped}" if ran else "") + ".")


def _register(client: MlflowClient, job: TrainJob, source: str, run_id: str, model_id: str,
              description: str = "") -> int:
    name = job.model_name
    try:
        client.create_registered_model(name, description=model_description(job.model_type))
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        if not (client.get_registered_model(name).description or ""):  # never overwrite one set by people
            client.update_registered_model(name, description=model_description(job.model_type))
    mv = client.create_model_version(
        name, source=source, run_id=run_id, model_id=model_id,
        tags={"job_id": job.job_id, "model_type": job.model_type}, description=description or None,
    )
    return int(mv.version)

