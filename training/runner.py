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
from collections.abc import Generator, Iterator
from typing import Any
from urllib.parse import urlparse

import numpy as np
from aqimodels.client.domain import MODEL_TYPE_NAMES
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.training.core import (
    HORIZON_HOURS,
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
    from aqimodels.process.settings import local_folder_problem

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
    if job.model_type not in MODEL_TYPE_NAMES:
        raise InvalidArgumentError(
            f"unknown model type {job.model_type!r}; expected one of {', '.join(MODEL_TYPE_NAMES)}", field="model_types"
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
    target = _target(job)
    target_transform(job)
    data = load_dataset(job.dataset, start=job.start_time, end=job.end_time, target=target)
    if job.model_type == "ensemble":
        return data, None, None, members  # type: ignore[return-value]  # features after loading members
    fs, pipe = build_features(data, window=window, horizon=HORIZON_HOURS, stride=_stride(job), target=target)
    return data, fs, pipe, members


def _target(job: TrainJob) -> str:
    from aqimodels.training.runtime.aqi import AQI_POLLUTANTS

    target = (job.target or "pm25").strip().lower()
    if target not in AQI_POLLUTANTS:
        raise InvalidArgumentError(
            f"target {job.target!r} is not a pollutant with AQI breakpoints; use one of {', '.join(AQI_POLLUTANTS)}",
            field="target")
    return target


def target_transform(job: TrainJob) -> str:
    """The job's ``extra["target_transform"]`` (``none`` when absent; see
    ``aqimodels.training.runtime.target_space``), refused INVALID_ARGUMENT when unknown."""
    from aqimodels.training.runtime.target_space import check_transform

    try:
        return str(check_transform(job.config.extra.get("target_transform", "")))
    except ValueError as e:
        raise InvalidArgumentError(str(e), field="config") from None


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
    from aqimodels.training.model import load_forecast_model
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
        return load_forecast_model(local)
    except MlflowException as e:
        raise InvalidArgumentError(f"cannot load ensemble member {uri}: {e.message}", field="model_types") from None


def _ensemble_features(job: TrainJob, data: AirQualityData, tracking_uri: str) -> tuple[FeatureSet, FeaturePipeline, list[Any], list[str]]:
    from aqimodels.training.model import AqiForecastModel

    members, names = [], []
    fingerprint, target = data.fingerprint(), _target(job)
    other_data, other_space = [], []
    for ref in job.ensemble_members:
        m = _load_member(ref.model_uri, tracking_uri)
        if not isinstance(m, AqiForecastModel):
            raise InvalidArgumentError(f"ensemble member {ref.model_uri} is not an AQI forecast model", field="model_types")
        trained_on = str(m.metadata.get("data_fingerprint", ""))
        if (trained_on and trained_on != fingerprint) or m.target != target:
            other_data.append(f"{ref.model_name} v{ref.version} (target {m.target}, data {trained_on[:12] or '?'})")
        wanted = job.config.extra.get("target_transform", "")
        if wanted and m.target_transform != target_transform(job):
            other_space.append(f"{ref.model_name} v{ref.version} ({m.target_transform})")
        members.append(m)
        name = ref.model_type
        names.append(name if name not in names else f"{name}_v{ref.version}")
    if other_data:
        raise InvalidArgumentError(
            f"ensemble member(s) {', '.join(other_data)} were trained and evaluated on other data than this "
            f"ensemble's ({job.dataset or 'synthetic'}, target {target}, data {fingerprint[:12]}); "
            "retrain them on this dataset in the same request, or choose members trained on it", field="model_types")
    if other_space:
        raise InvalidArgumentError(
            f"ensemble member(s) {', '.join(other_space)} were not trained with target_transform "
            f"{target_transform(job)}, which this ensemble asks for (an ensemble combines its members' forecasts and "
            "transforms nothing itself); retrain them with it in the same request, or leave target_transform out",
            field="config")
    window = max(m.window for m in members)
    fs, pipe = build_features(data, window=window, horizon=HORIZON_HOURS, stride=_stride(job), target=target)
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
    from aqimodels.training.model import input_example, raw_forecast
    _check(stop)
    fingerprint = data.fingerprint()

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp_id = _experiment(client, job.experiment_name, artifact_location or default_artifact_location(tracking_uri))
    _check_artifact_root(client, exp_id)
    lineage = evaluation_context(job, data, fs, fingerprint)
    if job.model_type == "ensemble":
        lineage.update(ensemble_lineage(job))
    tags = {"job_id": job.job_id, "model_type": job.model_type, "data_fingerprint": fingerprint,
            "dataset": job.dataset or "synthetic", "mlflow.runName": f"{job.model_type}-{job.job_id}",
            **lineage, **job.tags}
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
            "job_id": job.job_id, "target": fs.target, **sizes,
            **{f"extra_{k}": v for k, v in job.config.extra.items()},
        }
        params.update({f"member_{n}": f"{r.model_name}:{r.version}" for n, r in zip(member_names, job.ensemble_members, strict=True)})
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
                                          metadata={"job_id": job.job_id, "data_fingerprint": fingerprint, **lineage})
            test_raw = np.asarray(raw_forecast(model, fs.test.x), dtype=np.float64)
            test_pred = np.clip(test_raw, 0.0, None)
        else:
            model, test_pred, convergence = yield from _fit_ensemble(
                client, run_id, job, data, fs, members, member_names, stop)
            model.metadata.update({"data_fingerprint": fingerprint, **lineage})
            test_raw = None
        params["target_transform"] = model.target_transform
        training_seconds = time.monotonic() - t_train
        _check(stop)

        yield Evaluating(test_samples=len(fs.test))
        metrics = evaluate(test_pred, fs.test.y, fs.test.last_pm25, target=fs.target)
        metrics.update(bound_effect(test_raw, fs))
        metrics["negative_share"] = float(np.mean(np.asarray(test_pred) < 0))  # of what the model outputs
        champion, champion_tags = champion_scores(job, data, fs, tracking_uri)
        metrics.update(champion)
        lineage.update(champion_tags)
        if champion_tags:
            client.log_batch(run_id, tags=[_tag(k, v) for k, v in champion_tags.items()], synchronous=True)
        metrics.update(inference_speed(model, fs, data))
        metrics.update({
            "training_seconds": training_seconds, "total_seconds": time.monotonic() - t_start,
            "peak_memory_mb": _peak_memory_mb(),
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
        model_id, source = _log_model(client, exp_id, run_id, job, model, input_example(model, data))
        _check(stop)

        yield Registering(model_name=job.model_name)
        version = _register(client, job, source, run_id, model_id, lineage,
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


def _tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(key, str(value)[:5000])


def champion_scores(job: TrainJob, data: AirQualityData, fs: FeatureSet,
                    tracking_uri: str) -> tuple[dict[str, float], dict[str, str]]:
    """The production model (``job.champion_model_uri``) scored on exactly this training's test
    rows: ``champion_<metric>`` metrics, and tags naming it (``champion.skipped`` says why not)."""
    uri = job.champion_model_uri
    if not uri:
        return {}, {}
    tags = {"champion.model_uri": uri, "champion.version": uri.rsplit("/", 1)[-1]}
    try:
        champion = _load_member(uri, tracking_uri)
    except InvalidArgumentError as e:
        return {}, {**tags, "champion.skipped": str(e)[:500]}
    stations, target = list(getattr(champion, "stations", [])), getattr(champion, "target", "pm25")
    tags.update({"champion.stations": ",".join(sorted(stations)), "champion.target": target})
    if sorted(stations) != sorted(fs.stations) or target != fs.target:
        return {}, {**tags, "champion.skipped": f"production has stations {','.join(stations)} and target {target}; "
                                                f"this training {','.join(fs.stations)} and {fs.target}"}
    step = np.timedelta64(1, "h")
    try:
        part = data.slice(start=fs.test.times[0] - (int(champion.window) - 1) * step)
        pred, times = champion.predict_dataset(part)
        pred = _align(np.asarray(pred)[:, [stations.index(s) for s in fs.stations]], times, fs.test.times)
    except (InvalidArgumentError, RuntimeError, ValueError, KeyError) as e:
        return {}, {**tags, "champion.skipped": f"production could not be scored on these rows: {e}"[:500]}
    scored = evaluate(pred, fs.test.y, fs.test.last_pm25, target=fs.target)
    return {f"champion_{k}": float(v) for k, v in scored.items() if np.isfinite(v)}, tags


def _params(params: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]


def _fit_ensemble(
    client: MlflowClient, run_id: str, job: TrainJob, data: AirQualityData, fs: FeatureSet,
    members: list[Any], names: list[str], stop: threading.Event,
) -> Generator[EpochFinished, None, tuple[Any, np.ndarray, dict[str, float]]]:
    from aqimodels.training.model import EnsembleForecastModel
    from aqimodels.training.trainers.ensemble import fit_horizon_weights

    t0 = time.monotonic()
    val_preds, test_preds = [], []
    for i, (m, name) in enumerate(zip(members, names, strict=True), start=1):
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
    model = EnsembleForecastModel(members, weights, names, metadata={
        "job_id": job.job_id, "members": ",".join(f"{r.model_name}:{r.version}" for r in job.ensemble_members)})
    test_pred = model.combine(np.stack(test_preds))
    val_rmse = masked_rmse(model.combine(np.stack(val_preds)), fs.val.y)
    convergence = {"epochs_run": float(len(members)), "best_epoch": float(len(members)),
                   "final_loss": float((val_rmse / fs.target_std) ** 2), "early_stopped": 0.0,
                   "val_rmse": val_rmse}
    return model, test_pred, convergence


LATENCY_BATCH_ORIGINS = 100


def inference_speed(model: Any, fs: FeatureSet, data: AirQualityData) -> dict[str, float]:
    """Inference latency, one definition for every model type: raw long-format frame in, forecast
    frame out (``model.predict``, input checks and feature pipeline included).

    ``inference_latency_ms``: one origin (the frame of the last ``window`` test hours), median of
    a few calls. ``inference_batch_latency_ms``: ``params={"origins": [...]}`` with up to 100
    test origins evenly spaced, from one frame of the test period; ``inference_batch_origins`` how
    many; ``inference_throughput`` origins per second in that call."""
    step = np.timedelta64(1, "h")
    window = int(model.window)
    last = fs.test.times[-1]
    one = data.slice(start=last - (window - 1) * step, end=last + step).frame
    pick = np.unique(np.linspace(0, len(fs.test) - 1, min(LATENCY_BATCH_ORIGINS, len(fs.test))).round().astype(int))
    origins = fs.test.times[pick]
    tail = data.slice(start=origins[0] - (window - 1) * step, end=origins[-1] + step).frame
    params = {"allow_missing_inputs": True}  # the training data's own gaps are not the question here
    batch = {**params, "origins": [str(np.datetime_as_string(t, unit="s")) for t in origins]}
    model.predict(None, one, params)  # warm-up
    times = []
    for _ in range(LATENCY_REPEATS):
        t = time.perf_counter()
        model.predict(None, one, params)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    model.predict(None, tail, batch)
    elapsed = max(time.perf_counter() - t, 1e-9)
    return {"inference_latency_ms": float(np.median(times) * 1000), "inference_batch_latency_ms": elapsed * 1000,
            "inference_batch_origins": float(len(origins)), "inference_throughput": float(len(origins) / elapsed)}


def bound_effect(test_raw: np.ndarray | None, fs: FeatureSet) -> dict[str, float]:
    """What the lower bound at 0 changed on the test set: the share of forecast cells that were
    negative before it, and the rmse without it (``rmse_unbounded``, ``_hK``)."""
    if test_raw is None:  # the ensemble combines bounded members: nothing to bound
        return {}
    out = {"negative_share_unbounded": float(np.mean(test_raw < 0))}
    y = np.asarray(fs.test.y, dtype=np.float64)
    for key, sl in (("rmse_unbounded", slice(None)), *((f"rmse_unbounded_h{h}", slice(h - 1, h)) for h in (1, 6, 24))):
        p, t = test_raw[..., sl], y[..., sl]
        m = np.isfinite(t)
        if m.any():
            out[key] = float(np.sqrt(np.mean((p[m] - t[m]) ** 2)))
    return out


def _log_model(client: MlflowClient, exp_id: str, run_id: str, job: TrainJob, model: Any,
               example: Any = None) -> tuple[str, str]:
    """Save the pyfunc model and log it as an MLflow 3 logged model of the run: (model_id, source)."""
    from aqimodels.training.model import save_pyfunc

    lm = client.create_logged_model(exp_id, name="model", source_run_id=run_id, model_type=job.model_type,
                                    tags={"job_id": job.job_id, "model_type": job.model_type})
    try:
        with tempfile.TemporaryDirectory(prefix="aqimodel-") as tmp:
            path = os.path.join(tmp, "model")
            save_pyfunc(model, path, example)
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
              lineage: dict[str, str] | None = None, description: str = "") -> int:
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
        tags={"job_id": job.job_id, "model_type": job.model_type, **(lineage or {})}, description=description or None,
    )
    return int(mv.version)


# ---- lineage: what a version was evaluated on, and by which code ----

def code_version() -> dict[str, str]:
    """``code.version`` (the installed aqimodels distribution) and ``code.git_commit`` (when the
    source is a git checkout; with uncommitted changes it ends in ``-dirty``)."""
    import importlib.metadata
    import subprocess

    out = {}
    try:
        out["code.version"] = importlib.metadata.version("aqimodels")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - always installed here
        out["code.version"] = "unknown"
    here = os.path.dirname(os.path.realpath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        if commit.returncode == 0 and commit.stdout.strip():
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5, check=False)
            out["code.git_commit"] = commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def test_set_key(fs: FeatureSet) -> str:
    """SHA-256 of exactly the rows a version is scored on: station set, target, test origins and
    the observed test targets. Two versions with the same key were evaluated on the same data."""
    import hashlib

    h = hashlib.sha256(b"aqimodels-test-set-v1\n")
    h.update(",".join(fs.stations).encode() + b"\n" + fs.target.encode() + b"\n")
    h.update(np.asarray(fs.test.times, dtype="datetime64[ns]").astype(np.int64).tobytes())
    h.update(np.round(np.nan_to_num(np.asarray(fs.test.y, dtype=np.float64), nan=-1.0), 4).tobytes())
    return h.hexdigest()


def evaluation_context(job: TrainJob, data: AirQualityData, fs: FeatureSet, fingerprint: str) -> dict[str, str]:
    """The tags (run and version) that say on what a version was trained and evaluated."""
    return {
        "eval.dataset": job.dataset or "synthetic", "eval.data_fingerprint": fingerprint,
        "eval.stations": ",".join(fs.stations), "eval.target": fs.target,
        "eval.test_start": str(np.datetime_as_string(fs.test.times[0], unit="s")),
        "eval.test_end": str(np.datetime_as_string(fs.test.times[-1], unit="s")),
        "eval.test_origins": str(len(fs.test)), "eval.test_key": test_set_key(fs),
        **code_version(),
    }


def ensemble_lineage(job: TrainJob) -> dict[str, str]:
    """The exact member versions an ensemble combines (``ensemble.members``: name:version, ...)."""
    out = {"ensemble.members": ",".join(f"{r.model_name}:{r.version}" for r in job.ensemble_members)}
    out.update({f"ensemble.member.{r.model_type}": str(r.version) for r in job.ensemble_members})
    return out

