"""The MLflow adapter: the only module of the registry that imports mlflow.

It turns MLflow entities into the domain dataclasses and MLflow failures into domain errors:
``RESOURCE_DOES_NOT_EXIST`` -> not found, ``INVALID_PARAMETER_VALUE`` -> invalid argument,
``RESOURCE_ALREADY_EXISTS`` -> already exists, and a store that does not answer (database
down, file unreadable, tracking server unreachable) -> BackendUnavailableError.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import Engine

from aqimodels.client.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    InvalidArgumentError,
    ModelNotFoundError,
    VersionNotFoundError,
)
from aqimodels.server.dbtimeouts import DbTimeouts, bound_engine
from aqimodels.server.domain import BackendHealth, MetricValues, ModelVersion, RegisteredModel, metric_values

T = TypeVar("T")
# A model load with more uncached runs than this reads their metrics in one join on the model.
_BY_MODEL_ABOVE = 500

_UNAVAILABLE_HINTS = (
    "operationalerror",
    "could not connect",
    "connection refused",
    "unable to open database",
    "database is locked",
    "server closed the connection",
    "connection to server",
    "max retries exceeded",
    "failed to establish a new connection",
    "readonly database",
    "disk i/o error",
    "no such table",
    "timed out",
)


def _is_unavailable(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        kind = type(cur).__module__ + "." + type(cur).__name__
        if any(k in kind for k in ("sqlalchemy.exc.OperationalError", "sqlalchemy.exc.InterfaceError",
                                   "psycopg.OperationalError", "requests.exceptions.ConnectionError",
                                   "sqlite3.OperationalError", "urllib3.exceptions")):
            return True
        text = str(cur).lower()
        if any(h in text for h in _UNAVAILABLE_HINTS):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


# Engines (MLflow caches one per store URI, shared by every store on it) already given our timeouts.
_BOUND_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


class _QuietOutage(logging.Filter):
    """Drops the traceback MLflow logs for every call while its database is down.

    The adapter already answers such calls UNAVAILABLE and the health probe logs the outage
    once; a full traceback per call (dozens a second under load) would drown everything else.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and _is_unavailable(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
            record.msg = f"{record.getMessage().splitlines()[0]} (the MLflow database is unavailable)"
            record.args = ()
        return True


logging.getLogger("mlflow.store.db.utils").addFilter(_QuietOutage())


def _redact(uri: str) -> str:
    """The URI with any password replaced by ***."""
    if "://" in uri and "@" in uri.split("://", 1)[1]:
        scheme, rest = uri.split("://", 1)
        creds, host = rest.split("@", 1)
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":***"
        return f"{scheme}://{creds}@{host}"
    return uri


def _bounded_engine_first(uri: str, timeouts: DbTimeouts, registry: bool) -> None:
    """Gives MLflow's store for a database ``uri`` an engine bounded before its first connection.

    MLflow builds the engine of a SQL store with a retry loop (mlflow.store.db.utils,
    ``create_sqlalchemy_engine_with_retry``: 10 attempts, 102 s of back-off in all) around
    connections that have no timeout: on a database frozen or unreachable at start-up the first
    call, and so the registry's start, hung for ever. The engine is built here the way MLflow
    builds it (its pool settings, MLFLOW_SQLALCHEMYSTORE_*), bounded (connect, statement, lock,
    pool wait) and placed in the per-URI engine cache MLflow's stores read first, so the first
    call fails within the connect bound (UNAVAILABLE) and a later one simply connects again.
    """
    if uri.split(":", 1)[0].split("+", 1)[0] not in ("postgresql", "mysql", "mssql"):
        return  # SQLite, files and REST: no remote connection to bound at start
    from mlflow.store.db.utils import create_sqlalchemy_engine

    if registry:
        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as Store
    else:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as Store  # type: ignore[assignment]  # the tracking store when the registry store's module is absent
    with Store._engine_map_lock:  # MLflow's own cache of one engine per URI
        if uri not in Store._engine_map:
            engine = create_sqlalchemy_engine(uri)  # type: ignore[no-untyped-call]  # connects to nothing yet
            bound_engine(engine, timeouts)
            _BOUND_ENGINES.add(engine)
            Store._engine_map[uri] = engine


class MlflowModelStore:
    """Registry operations over one MLflow tracking store and model registry."""

    def __init__(self, tracking_uri: str, registry_uri: str | None = None, *, timeouts: DbTimeouts | None = None,
                 http_timeout_seconds: float | None = None, http_max_retries: int | None = None) -> None:
        """``timeouts``: bound MLflow's own database engine (connect, statement, lock) as ours.

        ``http_timeout_seconds`` / ``http_max_retries``: a tracking server over REST. MLflow reads
        these from its environment variables on every request (its only interface for them), so
        they are set there, process-wide, from the server's configuration.
        """
        self.tracking_uri = tracking_uri
        self._timeouts = timeouts
        self._bound = timeouts is None
        self._bind_lock = threading.Lock()
        if http_timeout_seconds is not None:
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(http_timeout_seconds)))
        if http_max_retries is not None:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(http_max_retries)
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        if timeouts is not None:
            for uri, registry in ((tracking_uri, False), (registry_uri or tracking_uri, True)):
                _bounded_engine_first(uri, timeouts, registry)
        self._registry_uri = registry_uri or tracking_uri
        self._mlflow_client: MlflowClient | None = None
        self._client_lock = threading.Lock()
        try:  # MlflowClient opens its tracking store (a first connection) as it is made
            self._mlflow_client = MlflowClient(tracking_uri=tracking_uri, registry_uri=self._registry_uri)
        except Exception as exc:
            if not _is_unavailable(exc):
                raise  # a bad URI is a configuration error, not an outage
            # a database down or frozen now: the client is made by the first call that reaches it
            # (UNAVAILABLE until then; the registry's start waits for it, server/app.py)
        # Metrics of finished runs never change: cache them by run id.
        self._run_metrics: dict[str, MetricValues] = {}
        self._metrics_lock = threading.Lock()
        # (operation, seconds) of every MLflow call, e.g. Metrics.observe_mlflow; set by create_server.
        self.observer: Callable[[str, float], None] | None = None

    @property
    def _client(self) -> MlflowClient:
        client = self._mlflow_client
        if client is None:
            with self._client_lock:
                if self._mlflow_client is None:
                    self._mlflow_client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self._registry_uri)
                client = self._mlflow_client
        return client

    # ---- error translation ----

    def _bind_engines(self) -> None:
        """Installs the timeouts on MLflow's SQLAlchemy engines once (they are shared per URI)."""
        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistrySql
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingSql

        with self._bind_lock:
            if self._bound:
                return
            assert self._timeouts is not None
            for store in (self._client._tracking_client.store, self._registry().store):
                if isinstance(store, (RegistrySql, TrackingSql)):
                    for engine in (store.engine, getattr(store, "read_engine", None)):
                        if engine is not None and engine not in _BOUND_ENGINES:
                            bound_engine(engine, self._timeouts)
                            _BOUND_ENGINES.add(engine)
            self._bound = True

    def _call(self, fn: Callable[[], T], *, name: str = "", version: int = 0) -> T:
        if not self._bound:
            self._call_unbound(self._bind_engines)
        return self._call_unbound(fn, name=name, version=version, frame=2)

    def _call_unbound(self, fn: Callable[[], T], *, name: str = "", version: int = 0, frame: int = 1) -> T:
        if self.observer is not None:  # the operation is the store method that called us
            fn = _timed(fn, self.observer, sys._getframe(frame).f_code.co_name.lstrip("_"))
        try:
            return fn()
        except MlflowException as exc:
            code = exc.error_code
            if code == "RESOURCE_DOES_NOT_EXIST":
                if version:
                    raise VersionNotFoundError(f"model {name!r} has no version {version}") from None
                if name:
                    raise ModelNotFoundError(f"model {name!r} is not registered") from None
                raise ModelNotFoundError(exc.message) from None
            if code == "RESOURCE_ALREADY_EXISTS":
                raise AlreadyExistsError(exc.message) from None
            if _is_unavailable(exc):
                raise BackendUnavailableError(f"MLflow store unavailable: {_short(exc)}") from exc
            if code == "INVALID_PARAMETER_VALUE":
                raise InvalidArgumentError(exc.message) from None
            raise
        except (AlreadyExistsError, ModelNotFoundError, VersionNotFoundError):
            raise
        except Exception as exc:
            if _is_unavailable(exc):
                raise BackendUnavailableError(f"MLflow store unavailable: {_short(exc)}") from exc
            raise

    # ---- reads ----

    def ping(self) -> BackendHealth:
        """Asks the store for one experiment; reports health and round-trip time.

        (Asking for one registered model made MLflow load all its versions to compute
        latest_versions: 40 ms a ping at 1,000 versions, every health interval.)
        """
        start = time.perf_counter()
        try:
            self._call(lambda: self._client.search_experiments(max_results=1))
        except BackendUnavailableError as exc:
            return BackendHealth(False, _redact(self.tracking_uri), exc.message,
                                 (time.perf_counter() - start) * 1000)
        except Exception as exc:  # noqa: BLE001 - an unexpected failure still means "not healthy", with its reason
            return BackendHealth(False, _redact(self.tracking_uri), _short(exc),
                                 (time.perf_counter() - start) * 1000)
        return BackendHealth(True, _redact(self.tracking_uri), "", (time.perf_counter() - start) * 1000)

    def list_models(self) -> list[RegisteredModel]:
        """Every registered model (prompts excluded, as MLflow's search does), by name, with aliases
        and newest version (no version counts).

        SQL stores: three queries on MLflow's tables. search_registered_models builds each
        model's latest_versions from every version row: seconds at 4 x 10,000 versions.
        """
        store = self._sql_registry_store()
        if store is not None:
            return self._call(lambda: _sql_list_models(store))
        out: list[RegisteredModel] = []
        token: str | None = None
        while True:
            page = self._call(functools.partial(self._client.search_registered_models,
                max_results=1000, order_by=["name ASC"], page_token=token))
            out.extend(_model(m) for m in page)
            token = page.token
            if not token:
                return out

    def get_model(self, name: str) -> RegisteredModel:
        return _model(self._call(lambda: self._client.get_registered_model(name), name=name))

    def list_versions(self, name: str, model: RegisteredModel | None = None) -> list[ModelVersion]:
        """All versions of a model with aliases and run metrics, newest first.

        ``model``: the model as just read (its aliases), to save reading it again.
        """
        model = model if model is not None else self.get_model(name)
        by_version = _aliases_by_version(model.aliases)
        raw: list[Any] = []
        token: str | None = None
        escaped = name.replace("'", "\\'")
        while True:
            page = self._call(functools.partial(self._client.search_model_versions,
                filter_string=f"name='{escaped}'", max_results=10000,
                order_by=["version_number DESC"], page_token=token), name=name)
            raw.extend(page)
            token = page.token
            if not token:
                break
        metrics = self.run_metrics([mv.run_id for mv in raw if mv.run_id])
        empty = metric_values((), ())
        return [_version(mv, by_version.get(int(mv.version), ()), metrics.get(mv.run_id, empty)) for mv in raw]

    def load_model(self, name: str) -> tuple[RegisteredModel, list[ModelVersion]]:
        """The model and all its versions with aliases, tags and run metrics, newest first.

        SQL stores: four indexed queries on MLflow's own tables through its own session and
        workspace filter. Through MlflowClient, get_registered_model builds latest_versions from
        every version and search_model_versions one entity per version with its tags and
        aliases: the first GetStatus at 4 x 10,000 versions took 47 s (bench/NOTES.md).
        """
        with gc_paused():
            return self._load_model(name)

    def _load_model(self, name: str) -> tuple[RegisteredModel, list[ModelVersion]]:
        store = self._sql_registry_store()
        if store is None:
            model = self.get_model(name)
            return model, self.list_versions(name, model)
        found = self._call(lambda: _sql_load_model(store, name), name=name)
        if found is None:
            raise ModelNotFoundError(f"model {name!r} is not registered")
        model, rows = found
        metrics = self.run_metrics([r[1] for r in rows if r[1]], model=name)
        empty = metric_values((), ())
        return model, [ModelVersion(name=name, version=number, run_id=run_id or "", source=source or "",
                                    create_time_ms=int(created or 0), update_time_ms=int(updated or 0),
                                    aliases=aliases, tags=tags, metrics=metrics.get(run_id, empty) if run_id else empty,
                                    description=description or "")
                       for number, run_id, source, created, updated, description, aliases, tags in rows]

    def probe(self, name: str) -> tuple[dict[str, int], int]:
        """The production and staging aliases and the newest version number of a model.

        Three indexed reads, whatever the model's size: the read model's change check. (Reading
        the registered model itself makes MLflow load every version to compute latest_versions:
        0.5 s at 10,000 versions.)
        """
        store = self._sql_registry_store()
        if store is not None:  # one session of three queries: 1-2 ms, against 18 ms for the client's three calls
            found = self._call(lambda: _sql_probe_all(store, only=name), name=name).get(name)
            if found is None:
                raise ModelNotFoundError(f"model {name!r} is not registered")
            return found
        aliases: dict[str, int] = {}
        for alias in ("production", "staging"):
            try:
                mv = self._call(functools.partial(self._client.get_model_version_by_alias, name, alias), name=name)
            except InvalidArgumentError:  # MLflow's answer for an alias that is not set
                continue
            aliases[alias] = int(mv.version)
        escaped = name.replace("'", "\\'")
        top = self._call(lambda: self._client.search_model_versions(
            filter_string=f"name='{escaped}'", max_results=1, order_by=["version_number DESC"]), name=name)
        return aliases, (int(top[0].version) if top else 0)

    def probe_all(self) -> dict[str, tuple[dict[str, int], int]] | None:
        """``probe`` for every registered model at once, in three queries (SQL stores; None elsewhere).

        The read model's refresher probes each model every half bound: three MLflow calls per
        model per second took the GIL away from requests (GetStatus p99 at 1 in flight 8.2 ms
        with the refresher, 2.8 ms with it idle; bench/NOTES.md).
        """
        store = self._sql_registry_store()
        if store is None:
            return None
        return self._call(lambda: _sql_probe_all(store))

    def _sql_registry_store(self) -> Any:
        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

        store = self._registry().store
        return store if isinstance(store, SqlAlchemyStore) else None

    def get_version(self, name: str, version: int) -> ModelVersion:
        model = self.get_model(name)
        mv = self._call(lambda: self._client.get_model_version(name, str(version)), name=name, version=version)
        metrics = self.run_metrics([mv.run_id] if mv.run_id else [])
        return _version(mv, _aliases_by_version(model.aliases).get(version, ()),
                        metrics.get(mv.run_id or "", metric_values((), ())))

    def run_metrics(self, run_ids: Iterable[str], model: str | None = None) -> dict[str, MetricValues]:
        """Latest metric values by run id; finished runs are cached for good.

        ``model``: the runs are that model's versions; on SQL stores, when many are not cached
        yet (a model's first load), they are read in one join on the model's name.
        """
        wanted = [r for r in dict.fromkeys(run_ids) if r]
        live: dict[str, MetricValues] = {}
        with self._metrics_lock:
            missing = [r for r in wanted if r not in self._run_metrics]
        sql = self._sql_tracking_store()
        registry = self._sql_registry_store() if sql is not None and model is not None else None
        if registry is not None and len(missing) > _BY_MODEL_ABOVE and _same_database(sql, registry):
            chunks: list[list[str] | None] = [None]
        else:
            step = 500 if sql is not None else 100
            chunks = [missing[i:i + step] for i in range(0, len(missing), step)]
        for chunk in chunks:
            if sql is None:
                found = self._searched_metrics(chunk or [])
            elif chunk is None:
                found = self._call(lambda: _sql_latest_metrics(sql, [], registry=registry, model=model),
                                   name=model or "")
            else:
                found = self._call(functools.partial(_sql_latest_metrics, sql, chunk))
            # keyed by the caller's run id strings (the versions hold the same ones): not a copy each
            same = {r: r for r in chunk} if chunk is not None else {r: r for r in missing}
            finished = {same.get(r, r): m for r, (status, m) in found.items()
                        if status in ("FINISHED", "FAILED", "KILLED")}
            live.update((r, m) for r, (status, m) in found.items() if r not in finished)
            with self._metrics_lock:
                self._run_metrics.update(finished)
        empty = metric_values((), ())
        with self._metrics_lock:  # shared, not copied: versions keep them read-only
            return {r: self._run_metrics.get(r) or live.get(r, empty) for r in wanted}

    def load_concurrency(self) -> int:
        """How many models the read model may load at once.

        A database server (PostgreSQL, MySQL) and ``mlflow server`` answer loads side by side,
        each in its own session or requests. SQLite and files one at a time: SQLite's driver
        hands the GIL over at every row, and four loads at once at 4 x 10,000 took 5.0 s
        against 2.4 s one after another (bench/NOTES.md).
        """
        sql = self._sql_registry_store()
        if sql is not None:
            return 1 if sql.engine.dialect.name == "sqlite" else 4
        return 4 if self.tracking_uri.startswith(("http://", "https://", "databricks")) else 1

    def _searched_metrics(self, run_ids: list[str]) -> dict[str, tuple[str, MetricValues]]:
        """(status, latest metrics) of runs through search_runs, one get_run for those it misses."""
        found = {r.info.run_id: r for r in self._search_runs(run_ids)}
        out: dict[str, tuple[str, MetricValues]] = {}
        for run_id in run_ids:
            run = found.get(run_id)
            if run is None:
                try:
                    run = self._call(functools.partial(self._client.get_run, run_id))
                except ModelNotFoundError:
                    continue
            items = run.data.metrics.items()
            out[run_id] = (run.info.status, metric_values([sys.intern(k) for k, _ in items],
                                                          [float(v) for _, v in items]))
        return out

    def _sql_tracking_store(self) -> Any:
        """MLflow's SQL tracking store when the tracking URI is a database, else None (REST, files)."""
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = self._client._tracking_client.store
        return store if isinstance(store, SqlAlchemyStore) else None

    def _search_runs(self, run_ids: list[str]) -> list[Any]:
        experiments = self._call(lambda: self._client.search_experiments(max_results=1000))
        ids = [e.experiment_id for e in experiments]
        if not ids:
            return []
        quoted = ", ".join(f"'{r}'" for r in run_ids)
        return list(self._call(lambda: self._client.search_runs(
            experiment_ids=ids, filter_string=f"attributes.run_id IN ({quoted})",
            max_results=len(run_ids) + 10)))

    # ---- writes ----
    # Aliases and version tags go to MLflow's registry client directly: MlflowClient first reads
    # the whole registered model for each of them (a check that the name is not a prompt), which
    # loads every version: 20-50 ms a write at 1,000 versions, 0.5 s at 10,000. The registry only
    # writes to models it has read as registered models, and validates names itself.

    def _registry(self) -> Any:
        return self._client._get_registry_client()  # type: ignore[no-untyped-call]  # MLflow's own accessor, unannotated

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._call(lambda: self._registry().set_registered_model_alias(name, alias, str(version)),
                   name=name, version=version)

    def delete_alias(self, name: str, alias: str) -> None:
        self._call(lambda: self._registry().delete_registered_model_alias(name, alias), name=name)

    def set_tag(self, name: str, version: int, key: str, value: str) -> None:
        self._call(lambda: self._registry().set_model_version_tag(name, str(version), key, value),
                   name=name, version=version)

    def delete_tag(self, name: str, version: int, key: str) -> None:
        try:
            self._call(lambda: self._registry().delete_model_version_tag(name, str(version), key),
                       name=name, version=version)
        except (ModelNotFoundError, VersionNotFoundError):
            pass  # the tag was not there: nothing to delete

    def delete_version(self, name: str, version: int) -> None:
        self._call(lambda: self._client.delete_model_version(name, str(version)), name=name, version=version)

    def terminate_run(self, run_id: str, status: str) -> None:
        """Ends a run that its worker could not end (the worker died): FAILED or KILLED."""
        run = self._call(lambda: self._client.get_run(run_id))
        if run.info.status in ("RUNNING", "SCHEDULED"):
            self._call(lambda: self._client.set_terminated(run_id, status))

    # ---- used by tests and benchmarks to build registries ----

    def create_version(self, name: str, metrics: dict[str, float], tags: dict[str, str] | None = None,
                       experiment_name: str = "aqi-predictor") -> int:
        """Creates a finished run with ``metrics`` and registers it as a new version of ``name``."""
        exp = self._client.get_experiment_by_name(experiment_name)
        exp_id = exp.experiment_id if exp else self._client.create_experiment(experiment_name)
        run = self._client.create_run(exp_id)
        now = int(time.time() * 1000)
        self._client.log_batch(run.info.run_id, metrics=[
            mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()])
        self._client.set_terminated(run.info.run_id, "FINISHED")
        try:
            self._client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = self._client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id,
                                               tags=tags or {})
        return int(mv.version)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _model(m: Any) -> RegisteredModel:
    aliases = {a: int(v) for a, v in (getattr(m, "aliases", None) or {}).items()}
    latest = max((int(v.version) for v in (m.latest_versions or [])), default=0)
    return RegisteredModel(
        name=m.name,
        description=m.description or "",
        create_time_ms=int(m.creation_timestamp or 0),
        update_time_ms=int(m.last_updated_timestamp or 0),
        aliases=aliases,
        latest_version=latest,
    )


def _aliases_by_version(aliases: dict[str, int]) -> dict[int, tuple[str, ...]]:
    """A model's aliases grouped by the version they point at, each group sorted."""
    grouped: dict[int, list[str]] = {}
    for alias, version in aliases.items():
        grouped.setdefault(int(version), []).append(alias)
    return {version: tuple(sorted(names)) for version, names in grouped.items()}


def _version(mv: Any, aliases: tuple[str, ...], metrics: MetricValues) -> ModelVersion:
    return ModelVersion(
        name=mv.name,
        version=int(mv.version),
        run_id=mv.run_id or "",
        source=mv.source or "",
        create_time_ms=int(mv.creation_timestamp or 0),
        update_time_ms=int(mv.last_updated_timestamp or 0),
        aliases=aliases,
        tags=dict(mv.tags or {}),
        metrics=metrics,
        description=mv.description or "",
    )


def _timed(fn: Callable[[], T], observer: Callable[[str, float], None], operation: str) -> Callable[[], T]:
    def timed() -> T:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            observer(operation, time.perf_counter() - start)

    return timed


def _sql_latest_metrics(store: Any, run_ids: list[str], *, registry: Any = None,
                        model: str | None = None) -> dict[str, tuple[str, MetricValues]]:
    """(status, latest metrics) of runs, read from MLflow's own tables with SQLAlchemy Core selects.

    ``run_ids``, or with ``registry`` and ``model`` every run of that model's live versions (one
    join instead of an IN list of thousands of ids; the tracking and registry stores share the
    database). search_runs builds whole Run entities (params, tags, inputs) for each run: 3.2 s
    for the metrics of 1,000 versions; the same selects through the ORM were still 1.1 s per model
    at 10,000 versions, now 0.3 s (bench/NOTES.md). Used only on SQL stores; over REST,
    search_runs is the only way.
    """
    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlRun

    runs, metrics = SqlRun.__table__, SqlLatestMetric.__table__
    value = sa.case((metrics.c.is_nan == sa.true(), sa.null()), else_=metrics.c.value)  # NULL: NaN
    if model is not None:
        from mlflow.entities.model_registry.model_version_stages import STAGE_DELETED_INTERNAL
        from mlflow.store.model_registry.dbmodels.models import SqlModelVersion

        mv = SqlModelVersion.__table__
        live = [mv.c.name == model, mv.c.current_stage != STAGE_DELETED_INTERNAL]
        if "workspace" in mv.c:
            live.append(mv.c.workspace == registry._get_active_workspace())
        # rows by version number (an int is cheaper to read than a run id), in the primary
        # key's order: no sort, and the rows of a run come together
        status_q = sa.select(mv.c.version, runs.c.run_uuid, runs.c.status).join(
            mv, mv.c.run_id == runs.c.run_uuid).where(*live)
        metric_q = sa.select(mv.c.version, metrics.c.key, value).join(
            mv, mv.c.run_id == metrics.c.run_uuid).where(*live).order_by(mv.c.version)
    else:
        status_q = sa.select(runs.c.run_uuid, runs.c.run_uuid.label("run"), runs.c.status).where(
            runs.c.run_uuid.in_(run_ids))
        metric_q = sa.select(metrics.c.run_uuid, metrics.c.key, value).where(
            metrics.c.run_uuid.in_(run_ids)).order_by(metrics.c.run_uuid)
    with gc_paused(), store.ManagedSessionMaker() as session:
        conn = session.connection()
        status = conn.execute(status_q).all()
        # The rows straight from the driver's cursor (the select still compiled and bound by
        # SQLAlchemy), a chunk at a time, cut into runs column-wise: a Row object and a Python
        # step per metric were most of the time at 270,000 rows a model.
        found = _cut_into_runs(conn.execute(metric_q).cursor)
    empty = metric_values((), ())
    return {run_uuid: (state, found.get(group, empty)) for group, run_uuid, state in status}


_CHUNK = 40_000  # rows read at a time: a model of 10,000 versions is 270,000 rows


def _cut_into_runs(cursor: Any) -> dict[Any, MetricValues]:
    """Metrics by group (run id or version) of (group, key, value or None for NaN) rows grouped
    by group, read in chunks (a chunk's last group is carried into the next)."""
    found: dict[Any, MetricValues] = {}
    carry: list[tuple[Any, ...]] = []
    while True:
        chunk = cursor.fetchmany(_CHUNK)
        rows = carry + chunk if carry else chunk
        if not rows:
            return found
        carry = []
        if chunk:
            last, cut = rows[-1][0], len(rows)
            while cut and rows[cut - 1][0] == last:
                cut -= 1
            carry, rows = rows[cut:], rows[:cut]
            if not rows:
                continue
        group_col, key_col, value_col = zip(*rows, strict=True)
        start = 0
        for group, rows_of_group in itertools.groupby(group_col):
            end = start + sum(1 for _ in rows_of_group)
            values: Sequence[Any] = value_col[start:end]
            if None in values:
                values = [math.nan if v is None else v for v in values]
            found[group] = metric_values(key_col[start:end], values)  # names shared per metric set
            start = end
        if not chunk:
            return found


_gc_lock = threading.Lock()
_gc_pauses = [0, False]  # pauses in progress, whether the collector was enabled before the first


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector while a bulk read builds objects (any thread).

    Reading a model of 10,000 versions makes over a million objects, none of them garbage; the
    collector ran again and again over all of them: 0.93 s of the metric read against 0.40 s
    paused (bench/NOTES.md). Reference counting still frees everything as usual.
    """
    with _gc_lock:
        if _gc_pauses[0] == 0:
            _gc_pauses[1] = gc.isenabled()
            gc.disable()
        _gc_pauses[0] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses[0] -= 1
            if _gc_pauses[0] == 0 and _gc_pauses[1]:
                gc.enable()


def _same_database(tracking: Any, registry: Any) -> bool:
    try:
        return str(tracking.engine.url) == str(registry.engine.url)
    except AttributeError:
        return False


def _sql_list_models(store: Any) -> list[RegisteredModel]:
    """What ``list_models`` reads through MlflowClient, from the registry store's tables."""
    from mlflow.prompt.constants import IS_PROMPT_TAG_KEY
    from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModel, SqlRegisteredModelTag

    probed = _sql_probe_all(store, all_aliases=True)
    with store.ManagedSessionMaker() as session:
        prompts = {name for (name,) in store._get_query(session, SqlRegisteredModelTag).filter(
            SqlRegisteredModelTag.key == IS_PROMPT_TAG_KEY, SqlRegisteredModelTag.value == "true").with_entities(
            SqlRegisteredModelTag.name)}
        rows = store._get_query(session, SqlRegisteredModel).with_entities(
            SqlRegisteredModel.name, SqlRegisteredModel.description, SqlRegisteredModel.creation_time,
            SqlRegisteredModel.last_updated_time).order_by(SqlRegisteredModel.name).all()
    return [RegisteredModel(name=name, description=description or "", create_time_ms=int(created or 0),
                            update_time_ms=int(updated or 0), aliases=probed.get(name, ({}, 0))[0],
                            latest_version=probed.get(name, ({}, 0))[1])
            for name, description, created, updated in rows if name not in prompts]


def _sql_load_model(store: Any, name: str) -> tuple[RegisteredModel, list[tuple[Any, ...]]] | None:
    """The model and its live versions as (number, run id, source, created, updated, description,
    aliases, tags), newest first; None when no such model."""
    from mlflow.entities.model_registry.model_version_stages import STAGE_DELETED_INTERNAL
    from mlflow.store.model_registry.dbmodels.models import (
        SqlModelVersion,
        SqlModelVersionTag,
        SqlRegisteredModel,
        SqlRegisteredModelAlias,
    )

    with store.ManagedSessionMaker() as session:
        row = store._get_query(session, SqlRegisteredModel).filter(SqlRegisteredModel.name == name).with_entities(
            SqlRegisteredModel.description, SqlRegisteredModel.creation_time,
            SqlRegisteredModel.last_updated_time).first()
        if row is None:
            return None
        aliases = {str(alias): int(v) for alias, v in store._get_query(session, SqlRegisteredModelAlias).filter(
            SqlRegisteredModelAlias.name == name).with_entities(SqlRegisteredModelAlias.alias,
                                                                SqlRegisteredModelAlias.version)}
        tags: dict[int, dict[str, str]] = {}
        for number, key, value in store._get_query(session, SqlModelVersionTag).filter(
                SqlModelVersionTag.name == name).with_entities(SqlModelVersionTag.version, SqlModelVersionTag.key,
                                                               SqlModelVersionTag.value):
            tags.setdefault(int(number), {})[sys.intern(key)] = value
        versions = store._get_query(session, SqlModelVersion).filter(
            SqlModelVersion.name == name, SqlModelVersion.current_stage != STAGE_DELETED_INTERNAL).with_entities(
            SqlModelVersion.version, SqlModelVersion.run_id, SqlModelVersion.source, SqlModelVersion.creation_time,
            SqlModelVersion.last_updated_time, SqlModelVersion.description).order_by(
            SqlModelVersion.version.desc()).all()
    by_version = _aliases_by_version(aliases)
    # Versions with the same tags share one dict (read-only: a change copies it, service._Writes):
    # most versions of a model carry the same few tags.
    shared: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
    for number, found in tags.items():
        tags[number] = shared.setdefault(tuple(sorted(found.items())), found)
    none: dict[str, str] = {}
    rows = [(int(number), run_id, source, created, updated, description or "",
             by_version.get(int(number), ()), tags.get(int(number), none))
            for number, run_id, source, created, updated, description in versions]
    model = RegisteredModel(name=name, description=row[0] or "", create_time_ms=int(row[1] or 0),
                            update_time_ms=int(row[2] or 0), aliases=aliases,
                            latest_version=rows[0][0] if rows else 0)
    return model, rows


def _sql_probe_all(store: Any, all_aliases: bool = False,
                   only: str | None = None) -> dict[str, tuple[dict[str, int], int]]:
    """Every registered model's production/staging aliases and newest live version, through the
    registry store's own session and workspace filter (the same rows ``probe`` reads model by model)."""
    import sqlalchemy as sa
    from mlflow.entities.model_registry.model_version_stages import STAGE_DELETED_INTERNAL
    from mlflow.store.model_registry.dbmodels.models import (
        SqlModelVersion,
        SqlRegisteredModel,
        SqlRegisteredModelAlias,
    )

    out: dict[str, tuple[dict[str, int], int]] = {}
    with store.ManagedSessionMaker() as session:
        models = store._get_query(session, SqlRegisteredModel)
        aliases = store._get_query(session, SqlRegisteredModelAlias)
        newest = store._get_query(session, SqlModelVersion).filter(
            SqlModelVersion.current_stage != STAGE_DELETED_INTERNAL)
        if only is not None:  # one model (``probe``): the same three queries, on its rows only
            models = models.filter(SqlRegisteredModel.name == only)
            aliases = aliases.filter(SqlRegisteredModelAlias.name == only)
            newest = newest.filter(SqlModelVersion.name == only)
        for (name,) in models.with_entities(SqlRegisteredModel.name):
            out[name] = ({}, 0)
        if not all_aliases:
            aliases = aliases.filter(SqlRegisteredModelAlias.alias.in_(("production", "staging")))
        for name, alias, version in aliases.with_entities(
                SqlRegisteredModelAlias.name, SqlRegisteredModelAlias.alias, SqlRegisteredModelAlias.version):
            if name in out:
                out[name][0][alias] = int(version)
        for name, number in newest.with_entities(SqlModelVersion.name, sa.func.max(SqlModelVersion.version)).group_by(
                SqlModelVersion.name):
            if name in out:
                out[name] = (out[name][0], int(number))
    return out
