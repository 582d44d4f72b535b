"""The registry's rules: lifecycle transitions, comparison, cleanup, audit.

It works on domain dataclasses through a :class:`ModelStore` and never imports mlflow or grpc.
Reads go through a read model kept in memory: per-model snapshots of versions with their metrics.
Writes made here update it in place (read-your-writes); a background refresher re-checks each
snapshot against the store with a cheap probe (the production and staging aliases and the newest
version number) well within ``cache_ttl_seconds`` and reloads a model when the probe differs, so
requests never wait for a reload and a replica never serves a production or staging version that
another writer (worker, replica, plain MLflow client) replaced more than ``cache_ttl_seconds`` ago.
If the refresher falls behind, the read verifies inline; if the store does not answer, reads of a
snapshot older than the bound fail UNAVAILABLE rather than serve it. Other changes by other writers
(tags alone, deleted versions, newly registered models) show at the next full reload, at most
``full_refresh_seconds`` later (stretched on very large registries so that reloading stays a small
share of one core). Every change takes the model's lock (database level), probes the current
state fresh from the store, writes an audit record before acting and completes it after.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from aqimodels.client.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    StaleVersionError,
    VersionNotFoundError,
)
from aqimodels.server.db import Database
from aqimodels.server.domain import (
    ARCHIVED_TAG,
    ARCHIVED_TIME_TAG,
    PREVIOUS_PRODUCTION_TAG,
    PRODUCTION_ALIAS,
    PROMOTED_TIME_TAG,
    STAGING_ALIAS,
    AuditRecord,
    BackendHealth,
    ModelVersion,
    Page,
    RegisteredModel,
    Stage,
    higher_is_better,
    tag_time,
)
from aqimodels.server.paging import SortedIndex, decode_token, encode_token, page_size, paginate

log = structlog.get_logger(__name__)

MAX_NAME_LENGTH = 256
_METRIC_RE = re.compile(r"^[A-Za-z0-9_.\-/ ]{1,250}$")


class ModelStore(Protocol):
    """What the service needs of MLflow (implemented by ``MlflowModelStore``)."""

    tracking_uri: str

    def ping(self) -> BackendHealth: ...
    def list_models(self) -> list[RegisteredModel]: ...
    def get_model(self, name: str) -> RegisteredModel: ...
    def list_versions(self, name: str, model: RegisteredModel | None = None) -> list[ModelVersion]: ...
    def load_model(self, name: str) -> tuple[RegisteredModel, list[ModelVersion]]: ...
    def probe(self, name: str) -> tuple[dict[str, int], int]: ...
    def probe_all(self) -> dict[str, tuple[dict[str, int], int]] | None: ...
    def set_alias(self, name: str, alias: str, version: int) -> None: ...
    def delete_alias(self, name: str, alias: str) -> None: ...
    def set_tag(self, name: str, version: int, key: str, value: str) -> None: ...
    def delete_tag(self, name: str, version: int, key: str) -> None: ...
    def delete_version(self, name: str, version: int) -> None: ...
    def terminate_run(self, run_id: str, status: str) -> None: ...


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token's name and role ("anonymous" without authentication)."""

    name: str = "anonymous"
    role: str = "admin"
    request_id: str = ""


@dataclass(frozen=True)
class ModelSnapshot:
    model: RegisteredModel
    versions: list[ModelVersion]  # newest first
    loaded_at: float  # monotonic time the full load started
    checked_at: float = 0.0  # monotonic time the last probe that confirmed it started
    # Sorted indexes of the versions, built on first use per (stage filter, order); shared by the
    # copies that only re-confirm the snapshot, replaced with the versions (see _Writes.apply).
    orders: dict[tuple[Any, ...], SortedIndex] = field(default_factory=dict, compare=False, repr=False)
    # Version number -> version, built on first use like ``orders`` and replaced with the versions.
    numbers: dict[int, ModelVersion] = field(default_factory=dict, compare=False, repr=False)

    def order(self, stage: Stage | None, field_name: str, descending: bool | None) -> SortedIndex:
        key = (stage, field_name, descending)
        index = self.orders.get(key)
        if index is None:  # two threads may both build it: the same result, no lock needed
            index = SortedIndex([v for v in self.versions if stage is None or v.stage == stage],
                                _version_sort_key(field_name, descending))
            self.orders[key] = index
        return index

    def _by_number(self) -> dict[int, ModelVersion]:
        if not self.numbers and self.versions:
            # Built whole, then merged in one C-level step: another thread never sees half of it.
            self.numbers.update({v.version: v for v in self.versions})
        return self.numbers

    def version(self, number: int) -> ModelVersion:
        found = self._by_number().get(number)
        if found is None:
            raise VersionNotFoundError(f"model {self.model.name!r} has no version {number}")
        return found

    def alias(self, alias: str) -> ModelVersion | None:
        number = self.model.aliases.get(alias)
        return self._by_number().get(number) if number else None


@dataclass(frozen=True)
class ModelStatusView:
    snapshot: ModelSnapshot
    running_jobs: list[Any]
    degraded: bool = False


@dataclass(frozen=True)
class Comparison:
    name: str
    metric: str
    higher_is_better: bool
    rows: list[tuple[ModelVersion, int, float, float]]  # version, rank, value, delta to best
    best_version: int
    metric_names: list[str]


@dataclass(frozen=True)
class PromotionResult:
    version: ModelVersion
    previous_version: int
    archived_versions: list[int]
    audit_event_id: str


@dataclass(frozen=True)
class CleanupResult:
    deleted: list[int]
    kept: list[int]
    protected: list[int]
    dry_run: bool
    audit_event_id: str


@dataclass
class _Cache:
    models: tuple[float, list[RegisteredModel]] | None = None
    snapshots: dict[str, ModelSnapshot] = field(default_factory=dict)


_WATCHED_ALIASES = (PRODUCTION_ALIAS, STAGING_ALIAS)


class _Writes:
    """The store's write calls of a promotion or rollback, recorded to update the snapshot in place."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.aliases: dict[str, int | None] = {}
        self.tags: dict[int, dict[str, str | None]] = {}

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self.store.set_alias(name, alias, version)
        self.aliases[alias] = version

    def delete_alias(self, name: str, alias: str) -> None:
        self.store.delete_alias(name, alias)
        self.aliases[alias] = None

    def set_tag(self, name: str, version: int, key: str, value: str) -> None:
        self.store.set_tag(name, version, key, value)
        self.tags.setdefault(version, {})[key] = value

    def delete_tag(self, name: str, version: int, key: str) -> None:
        self.store.delete_tag(name, version, key)
        self.tags.setdefault(version, {})[key] = None

    def apply(self, snap: ModelSnapshot) -> ModelSnapshot:
        aliases = dict(snap.model.aliases)
        for alias, version in self.aliases.items():
            if version is None:
                aliases.pop(alias, None)
            else:
                aliases[alias] = version
        versions = []
        for v in snap.versions:
            new_aliases = tuple(sorted(a for a, n in aliases.items() if n == v.version))
            changes = self.tags.get(v.version)
            if new_aliases != v.aliases or changes:
                tags = dict(v.tags)
                for key, value in (changes or {}).items():
                    if value is None:
                        tags.pop(key, None)
                    else:
                        tags[key] = value
                v = replace(v, aliases=new_aliases, tags=tags)
            versions.append(v)
        return replace(snap, model=replace(snap.model, aliases=aliases), versions=versions, orders={}, numbers={})


_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f]")


def validate_name(name: str, field_name: str = "name") -> str:
    if not name or not name.strip():
        raise InvalidArgumentError(f"{field_name} is required", field=field_name)
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgumentError(f"{field_name} is longer than {MAX_NAME_LENGTH} characters",
                                   field=field_name)
    if _CONTROL_CHARACTERS.search(name):
        raise InvalidArgumentError(f"{field_name} contains control characters", field=field_name)
    return name


def validate_version(version: int, field_name: str = "version") -> int:
    if version <= 0:
        raise InvalidArgumentError(f"{field_name} must be a positive integer, got {version}", field=field_name)
    return version


def validate_metric(metric: str, field_name: str = "metric") -> str:
    metric = metric or "rmse"
    if not _METRIC_RE.match(metric):
        raise InvalidArgumentError(f"{field_name} {metric[:50]!r} is not a valid metric name", field=field_name)
    return metric


def _now_ms() -> int:
    return int(time.time() * 1000)


class RegistryService:
    """Status, listing, comparison, promotion, rollback, cleanup and audit over a ModelStore."""

    def __init__(self, store: ModelStore, db: Database, *, cache_ttl_seconds: float = 2.0,
                 running_jobs: Callable[[], dict[str, list[Any]]] | None = None,
                 full_refresh_seconds: float = 30.0, health_max_age_seconds: float = 5.0) -> None:
        self.store = store
        self.db = db
        self.cache_ttl = cache_ttl_seconds
        self.full_refresh = full_refresh_seconds
        self.health_max_age = health_max_age_seconds
        self._cache = _Cache()
        self._cache_lock = threading.Lock()
        self._running_jobs = running_jobs or (lambda: {})
        self._degraded: set[str] = set()
        self._health: tuple[float, BackendHealth] | None = None
        self._load_cost: dict[str, float] = {}  # seconds of the last full load, per model ("" = model list)
        self._loading: dict[str, threading.Lock] = {}  # one load per model at a time (see _load)
        self._stop_refresh = threading.Event()
        self._refresher: threading.Thread | None = None
        # Write generations: a load that overlapped a write (or an invalidation) is not cached.
        self._gen: dict[str, int] = {}
        self._gen_all = 0

    # ---- read model ----

    def invalidate(self, name: str | None = None) -> None:
        """Drops cached state (one model, or everything) after a write."""
        with self._cache_lock:
            self._cache.models = None
            if name is None:
                self._gen_all += 1
                self._cache.snapshots.clear()
            else:
                self._gen[name] = self._gen.get(name, 0) + 1
                self._cache.snapshots.pop(name, None)

    def _generation(self, name: str) -> tuple[int, int]:
        with self._cache_lock:
            return self._gen_all, self._gen.get(name, 0)

    def _bump(self, name: str) -> None:
        with self._cache_lock:
            self._gen[name] = self._gen.get(name, 0) + 1

    def _full_refresh_after(self, key: str) -> float:
        """Seconds between full reloads: ``full_refresh_seconds``, stretched so reloading stays under 5%."""
        return max(self.full_refresh, 20 * self._load_cost.get(key, 0.0))

    def _models_ttl(self) -> float:
        # The model list comes from MLflow's search, which loads every version of every model:
        # refreshed every cache_ttl while that costs under a tenth of the interval, else less often.
        return max(self.cache_ttl, 10 * self._load_cost.get("", 0.0))

    def _load_models(self) -> list[RegisteredModel]:
        started = time.monotonic()
        models = self.store.list_models()
        self._load_cost[""] = time.monotonic() - started
        with self._cache_lock:
            if self._cache.models is None or self._cache.models[0] < started:
                self._cache.models = (started, models)
        return models

    def _models(self) -> list[RegisteredModel]:
        with self._cache_lock:
            cached = self._cache.models
        if cached and time.monotonic() - cached[0] < self._models_ttl():
            return cached[1]
        return self._load_models()

    def _put(self, snap: ModelSnapshot, gen: tuple[int, int] | None) -> ModelSnapshot:
        """Caches ``snap`` read at write generation ``gen`` (None: our own writes, always kept).

        A read that overlapped a write is returned but not cached; a snapshot confirmed later
        than ``snap`` is kept (and returned) instead.
        """
        name = snap.model.name
        with self._cache_lock:
            if gen is not None:
                if gen != (self._gen_all, self._gen.get(name, 0)):
                    return snap
                current = self._cache.snapshots.get(name)
                if current is not None and current.checked_at > snap.checked_at:
                    return current
            self._cache.snapshots[name] = snap
            models = self._cache.models
            if models is not None and all(m.name != name for m in models[1]):
                self._cache.models = None  # a model the list does not know yet: list again
        return snap

    def _load(self, name: str, *, fresh: bool = True) -> ModelSnapshot:
        """Reads the model and all its versions (with run metrics) from the store.

        One load per model at a time: a caller that finds one running waits for it, then takes
        the snapshot it cached if no write came between and, with ``fresh``, if that load started
        after the caller asked; without ``fresh`` (a read that found no snapshot), any snapshot
        within the cache bound will do. At start the refresher's warm-up and the first requests
        each loaded every model: twice the work, 8.5 s for the first GetStatus at 4 x 10,000.
        """
        asked = time.monotonic()
        gen = self._generation(name)
        with self._cache_lock:
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:
            with self._cache_lock:
                done = self._cache.snapshots.get(name)
            if done is not None and self._generation(name) == gen and (
                    done.loaded_at >= asked if fresh else time.monotonic() - done.checked_at < self.cache_ttl):
                return done
            return self._read(name)

    def _read(self, name: str) -> ModelSnapshot:
        gen = self._generation(name)
        started = time.monotonic()
        model, versions = self.store.load_model(name)
        self._load_cost[name] = time.monotonic() - started
        return self._put(ModelSnapshot(model=_with_counts(model, versions), versions=versions, loaded_at=started,
                                       checked_at=started), gen)

    def _verify(self, snap: ModelSnapshot) -> ModelSnapshot:
        """Confirms a snapshot with the store's cheap probe, or reloads the model when it moved on."""
        name = snap.model.name
        gen = self._generation(name)
        started = time.monotonic()
        aliases, newest = self.store.probe(name)
        return self._confirm(snap, gen, started, aliases, newest)

    def _confirm(self, snap: ModelSnapshot, gen: tuple[int, int], started: float, aliases: dict[str, int],
                 newest: int) -> ModelSnapshot:
        """Keeps ``snap`` (confirmed at ``started``) when the probe matches it, else reloads the model."""
        name = snap.model.name
        known = {a: v for a, v in snap.model.aliases.items() if a in _WATCHED_ALIASES}
        if (aliases == known and newest == snap.model.latest_version
                and started - snap.loaded_at < self._full_refresh_after(name)):
            return self._put(replace(snap, checked_at=started), gen)
        return self._load(name)

    def snapshot(self, name: str, *, fresh: bool = False) -> ModelSnapshot:
        """The model's snapshot, confirmed against the store less than ``cache_ttl`` ago.

        ``fresh``: reloaded from the store now.
        """
        validate_name(name)
        if fresh:
            return self._load(name)
        return self._snapshot(name)

    def _snapshot(self, name: str) -> ModelSnapshot:
        """``snapshot`` of a name already known valid (from the store's own model list)."""
        with self._cache_lock:
            snap = self._cache.snapshots.get(name)
        if snap is None:
            return self._load(name, fresh=False)
        if time.monotonic() - snap.checked_at >= self.cache_ttl:
            return self._verify(snap)  # the refresher fell behind: confirm inline
        return snap

    def _confirmed(self, name: str) -> ModelSnapshot:
        """The snapshot confirmed by a probe now (reloaded if anything moved): for changes under the lock."""
        with self._cache_lock:
            snap = self._cache.snapshots.get(name)
        return self._load(name) if snap is None else self._verify(snap)

    def refresh_once(self) -> None:
        """One pass of the background refresher: probes every snapshot half way through its bound."""
        now = time.monotonic()
        with self._cache_lock:
            snaps = list(self._cache.snapshots.values())
            models = self._cache.models
        due = [s for s in snaps if now - s.checked_at >= self.cache_ttl / 2]
        batch: dict[str, tuple[dict[str, int], int]] | None = None
        gens = {s.model.name: self._generation(s.model.name) for s in due}
        started = time.monotonic()
        list_due = models is not None and now - models[0] >= self.cache_ttl / 2
        if due or list_due:
            try:  # one probe of every model where the store can (SQL), else one per model below
                batch = self.store.probe_all()
            except Exception as exc:  # noqa: BLE001 - the store is down: reads will verify and fail
                log.debug("snapshot_refresh_failed", error=str(exc)[:200])
                return
        for snap in due:
            if self._stop_refresh.is_set():
                return
            name = snap.model.name
            try:
                if batch is not None and name in batch:
                    self._confirm(snap, gens[name], started, *batch[name])
                else:
                    self._verify(snap)  # per model; a deleted model answers NOT_FOUND there
            except Exception as exc:  # noqa: BLE001 - the store is down: reads will verify and fail
                log.debug("snapshot_refresh_failed", model=name, error=str(exc)[:200])
        if models is None:
            return
        if batch is None:  # no probe of every model: list them again on the list's own timer
            reload = now - models[0] >= self._models_ttl() / 2
        else:  # the probe names every registered model: list them again only when the names moved
            reload = set(batch) != {m.name for m in models[1]}
            if not reload:
                with self._cache_lock:  # the same names: the list is confirmed as of this probe
                    if self._cache.models is models:
                        self._cache.models = (started, models[1])
        if reload:
            try:
                self._load_models()
            except Exception as exc:  # noqa: BLE001 - as above
                log.debug("model_list_refresh_failed", error=str(exc)[:200])

    def start_refresher(self) -> None:
        """Keeps the read model confirmed in the background so requests never wait for the store."""
        if self._refresher is not None:
            return
        interval = min(1.0, max(0.02, self.cache_ttl / 4))

        def run() -> None:
            try:  # warm: load every model once, off the request path (the list itself is not kept)
                for m in self.store.list_models():
                    if self._stop_refresh.is_set():
                        return
                    self._load(m.name, fresh=False)
            except Exception as exc:  # noqa: BLE001 - the store is down: requests load on demand
                log.debug("read_model_warmup_failed", error=str(exc)[:200])
            while not self._stop_refresh.wait(interval):
                self.refresh_once()

        self._refresher = threading.Thread(target=run, name="read-model-refresher", daemon=True)
        self._refresher.start()

    def stop_refresher(self) -> None:
        self._stop_refresh.set()
        if self._refresher is not None:
            self._refresher.join(5)

    def set_degraded(self, name: str, degraded: bool) -> None:
        """Marks a model DEGRADED (live performance worse than its test metrics) or healthy."""
        if degraded:
            self._degraded.add(name)
        else:
            self._degraded.discard(name)

    # ---- status and listing ----

    def backend_health(self) -> BackendHealth:
        """Pings the store (the health probe calls this every interval); GetStatus reuses the answer."""
        health = self.store.ping()
        self._health = (time.monotonic(), health)
        return health

    def last_health(self) -> BackendHealth:
        """The health probe's last answer while recent, else a ping now."""
        cached = self._health
        if cached is not None and time.monotonic() - cached[0] < self.health_max_age:
            return cached[1]
        return self.backend_health()

    def status(self) -> tuple[list[ModelStatusView], BackendHealth]:
        health = self.last_health()
        if not health.healthy:
            return [], health
        jobs = self._running_jobs()
        views = [ModelStatusView(self._snapshot(m.name), jobs.get(m.name, []), m.name in self._degraded)
                 for m in self._models()]
        return views, health

    def list_models(self, size: int, token: str) -> Page:
        size = page_size(size)
        models = [self.snapshot(m.name).model for m in self._models()]
        page, next_token = paginate(models, lambda m: (m.name,), size, token, ("models",))
        return Page(page, next_token, len(models))

    def list_versions(self, name: str, size: int, token: str, stage: Stage | None, order_by: str) -> Page:
        size = page_size(size)
        field_name, descending = _parse_order_by(order_by)
        index = self.snapshot(name).order(stage, field_name, descending)
        page, next_token = index.page(size, token, ("versions", name, stage and stage.value, field_name, descending))
        return Page(page, next_token, len(index.items))

    def get_version(self, name: str, version: int) -> ModelVersion:
        validate_version(version)
        snap = self.snapshot(name)
        try:
            return snap.version(version)
        except VersionNotFoundError:
            # A version registered since the snapshot was taken: look once more, fresh.
            return self.snapshot(name, fresh=True).version(version)

    def compare(self, name: str, versions: Iterable[int], metric: str) -> Comparison:
        metric = validate_metric(metric)
        snap = self.snapshot(name)
        wanted = list(dict.fromkeys(validate_version(v, "versions") for v in versions))
        chosen = [snap.version(v) for v in wanted] if wanted else list(snap.versions)
        names = sorted({k for v in chosen for k in v.metrics})
        if chosen and names and metric not in names:
            raise InvalidArgumentError(
                f"metric {metric!r} is not logged for any compared version of {name!r}; "
                f"known metrics: {', '.join(names[:20])}", field="metric")
        hib = higher_is_better(metric)
        scored = [(v, v.metrics.get(metric, math.nan)) for v in chosen]
        with_value = sorted((s for s in scored if not math.isnan(s[1])),
                            key=lambda s: ((-s[1] if hib else s[1]), -s[0].version))
        without = [s for s in scored if math.isnan(s[1])]
        best = with_value[0][1] if with_value else math.nan
        rows = []
        for rank, (v, value) in enumerate(with_value, start=1):
            delta = 0.0 if best == 0 else (value - best) / abs(best)
            rows.append((v, rank, value, -delta if hib else delta))
        rows += [(v, 0, math.nan, math.nan) for v, _ in without]
        return Comparison(name, metric, hib, rows, with_value[0][0].version if with_value else 0, names)

    # ---- mutations ----

    def _state(self, snap: ModelSnapshot) -> dict[str, Any]:
        return {"production": snap.model.aliases.get(PRODUCTION_ALIAS),
                "staging": snap.model.aliases.get(STAGING_ALIAS)}

    def promote(self, caller: Caller, name: str, version: int, stage: Stage | None,
                expected_current: int | None, select_best_by: str = "", reason: str = "") -> PromotionResult:
        validate_name(name)
        if stage not in (Stage.STAGING, Stage.PRODUCTION, Stage.ARCHIVED):
            raise InvalidArgumentError("stage must be staging, production or archived", field="stage")
        if select_best_by:
            if version:
                raise InvalidArgumentError("give either version or select_best_by, not both", field="version")
            validate_metric(select_best_by, "select_best_by")
        else:
            validate_version(version)
        if expected_current is not None and expected_current < 0:
            raise InvalidArgumentError("expected_current_version must not be negative",
                                       field="expected_current_version")
        if expected_current is not None and stage == Stage.ARCHIVED:
            raise InvalidArgumentError("expected_current_version applies to production and staging only",
                                       field="expected_current_version")
        with self.db.model_lock(name):
            replay = self._replay("PromoteModelVersion", caller.request_id, name)
            if replay is not None:
                return replay
            snap = self._confirmed(name)
            w = _Writes(self.store)
            if select_best_by:
                comparison = self.compare(name, [], select_best_by)
                if not comparison.best_version:
                    raise FailedPreconditionError(f"no version of {name!r} has metric {select_best_by!r}")
                version = comparison.best_version
            target = snap.version(version)
            before = self._state(snap)
            alias = {Stage.PRODUCTION: PRODUCTION_ALIAS, Stage.STAGING: STAGING_ALIAS}.get(stage)
            current = snap.model.aliases.get(alias, 0) if alias else 0
            if expected_current is not None and expected_current != current:
                raise StaleVersionError(
                    f"{stage.name.lower()} of {name!r} is "
                    f"{'version ' + str(current) if current else 'empty'}, not the expected "
                    f"{'version ' + str(expected_current) if expected_current else 'empty'}; "
                    "read the status again and retry")
            if target.stage == stage:
                raise FailedPreconditionError(f"version {version} of {name!r} is already {stage.name.lower()}")
            if target.stage == Stage.PRODUCTION:
                raise FailedPreconditionError(
                    f"version {version} of {name!r} is in production; promote another version to "
                    "production or roll back first")
            audit_id = self.db.audit_begin(
                actor=caller.name, role=caller.role, action="PromoteModelVersion", model_name=name,
                version=version, before=before, request_id=caller.request_id,
                message=f"{stage.name.lower()}" + (f": {reason}" if reason else ""))
            archived: list[int] = []
            self._bump(name)
            try:
                now = tag_time(_now_ms())
                if stage == Stage.PRODUCTION:
                    w.set_alias(name, PRODUCTION_ALIAS, version)
                    if current and current != version:
                        w.set_tag(name, current, ARCHIVED_TAG, "true")
                        w.set_tag(name, current, ARCHIVED_TIME_TAG, now)
                        w.set_tag(name, version, PREVIOUS_PRODUCTION_TAG, str(current))
                        archived.append(current)
                    if snap.model.aliases.get(STAGING_ALIAS) == version:
                        w.delete_alias(name, STAGING_ALIAS)
                    w.set_tag(name, version, PROMOTED_TIME_TAG, now)
                    if target.stage == Stage.ARCHIVED:
                        w.delete_tag(name, version, ARCHIVED_TAG)
                elif stage == Stage.STAGING:
                    w.set_alias(name, STAGING_ALIAS, version)
                    if target.stage == Stage.ARCHIVED:
                        w.delete_tag(name, version, ARCHIVED_TAG)
                else:
                    if target.stage == Stage.STAGING:
                        w.delete_alias(name, STAGING_ALIAS)
                    w.set_tag(name, version, ARCHIVED_TAG, "true")
                    w.set_tag(name, version, ARCHIVED_TIME_TAG, now)
            except Exception as exc:
                self.invalidate(name)
                after_fail = self._state(self.snapshot(name, fresh=True))
                self.db.audit_finish(audit_id, outcome="failed", after=after_fail, message=str(exc)[:500])
                raise
            # Our own writes, applied to the snapshot just confirmed under the lock: no reload.
            self._bump(name)
            after_snap = self._put(w.apply(snap), None)
            self.db.audit_finish(audit_id, outcome="ok", after=self._state(after_snap))
            result = PromotionResult(after_snap.version(version), current, archived, audit_id)
            self._remember("PromoteModelVersion", caller.request_id, result)
        log.info("model_version_promoted", model=name, version=version, stage=stage.name.lower(),
                 previous=current or None, archived=archived)
        return result

    def rollback(self, caller: Caller, name: str, expected_current: int | None, reason: str = "") -> PromotionResult:
        validate_name(name)
        with self.db.model_lock(name):
            replay = self._replay("RollbackModel", caller.request_id, name)
            if replay is not None:
                return replay
            snap = self._confirmed(name)
            w = _Writes(self.store)
            current = snap.model.aliases.get(PRODUCTION_ALIAS, 0)
            if expected_current is not None and expected_current != current:
                raise StaleVersionError(f"production of {name!r} is version {current or 'none'}, "
                                        f"not the expected {expected_current}")
            if not current:
                raise FailedPreconditionError(f"{name!r} has no production version to roll back")
            prod = snap.version(current)
            previous_raw = prod.tags.get(PREVIOUS_PRODUCTION_TAG, "")
            if not previous_raw.isdigit():
                raise FailedPreconditionError(
                    f"version {current} of {name!r} replaced no earlier production version; "
                    "nothing to roll back to")
            previous = int(previous_raw)
            if previous not in {v.version for v in snap.versions}:
                raise FailedPreconditionError(
                    f"the previous production version {previous} of {name!r} was deleted; "
                    "promote a version explicitly instead")
            before = self._state(snap)
            audit_id = self.db.audit_begin(
                actor=caller.name, role=caller.role, action="RollbackModel", model_name=name,
                version=previous, before=before, request_id=caller.request_id,
                message=f"rollback {current} -> {previous}" + (f": {reason}" if reason else ""))
            try:
                self._bump(name)
                now = tag_time(_now_ms())
                w.set_alias(name, PRODUCTION_ALIAS, previous)
                w.delete_tag(name, previous, ARCHIVED_TAG)
                w.set_tag(name, previous, PROMOTED_TIME_TAG, now)
                if snap.model.aliases.get(STAGING_ALIAS) == previous:
                    w.delete_alias(name, STAGING_ALIAS)
                w.set_tag(name, current, ARCHIVED_TAG, "true")
                w.set_tag(name, current, ARCHIVED_TIME_TAG, now)
            except Exception as exc:
                self.invalidate(name)
                self.db.audit_finish(audit_id, outcome="failed",
                                     after=self._state(self.snapshot(name, fresh=True)), message=str(exc)[:500])
                raise
            self._bump(name)
            after_snap = self._put(w.apply(snap), None)
            self.db.audit_finish(audit_id, outcome="ok", after=self._state(after_snap))
            result = PromotionResult(after_snap.version(previous), current, [current], audit_id)
            self._remember("RollbackModel", caller.request_id, result)
        log.info("model_rolled_back", model=name, version=previous, replaced=current)
        return result

    def cleanup(self, caller: Caller, name: str, keep_last: int, versions: list[int], dry_run: bool,
                older_than_ms: int | None = None) -> CleanupResult:
        """Deletes old versions of a model, never an aliased one.

        Args:
            keep_last: keep the newest N versions (0: no such rule, then ``older_than_ms`` is required).
            versions: delete exactly these instead.
            older_than_ms: delete only versions registered before this time (epoch ms); with
                ``keep_last`` a version goes only when both rules let it go (retention policy).
        """
        validate_name(name)
        if keep_last < 0:
            raise InvalidArgumentError(f"keep_last must not be negative, got {keep_last}", field="keep_last")
        if versions and keep_last:
            raise InvalidArgumentError("give either keep_last or versions, not both", field="versions")
        if versions and older_than_ms is not None:
            raise InvalidArgumentError("give either an age limit or versions, not both", field="versions")
        if not versions and keep_last == 0 and older_than_ms is None:
            raise InvalidArgumentError("keep_last must be at least 1 (or name the versions to delete)",
                                       field="keep_last")
        with self.db.model_lock(name):
            snap = self.snapshot(name, fresh=True)
            aliased = {v.version for v in snap.versions if v.aliases}
            if versions:
                chosen = [snap.version(validate_version(v, "versions")) for v in dict.fromkeys(versions)]
                blocked = sorted(v.version for v in chosen if v.aliases)
                if blocked:
                    names = ", ".join(f"{v} ({'/'.join(snap.version(v).aliases)})" for v in blocked)
                    raise FailedPreconditionError(
                        f"cannot delete aliased version(s) {names} of {name!r}; promote or archive "
                        "other versions first")
                delete = sorted(v.version for v in chosen)
            else:
                newest = {v.version for v in snap.versions[:keep_last]} if keep_last else set()
                delete = sorted(v.version for v in snap.versions
                                if v.version not in newest and v.version not in aliased
                                and (older_than_ms is None or v.create_time_ms < older_than_ms))
            kept = sorted(v.version for v in snap.versions if v.version not in delete)
            protected = sorted(aliased)
            before = {"versions": sorted(v.version for v in snap.versions), **self._state(snap)}
            if dry_run or not delete:
                audit_id = self.db.audit_record(
                    actor=caller.name, role=caller.role, action="CleanupModelVersions", model_name=name,
                    version=0, before=before, after={**before, "would_delete": delete},
                    outcome="dry_run" if dry_run else "ok", request_id=caller.request_id,
                    message=f"{'dry run: ' if dry_run else ''}{len(delete)} version(s) to delete")
                return CleanupResult(delete, kept, protected, dry_run, audit_id)
            audit_id = self.db.audit_begin(
                actor=caller.name, role=caller.role, action="CleanupModelVersions", model_name=name,
                version=0, before=before, request_id=caller.request_id,
                message=f"delete {len(delete)} version(s): {delete}")
            done: list[int] = []
            try:
                for v in delete:
                    self.store.delete_version(name, v)
                    done.append(v)
            except Exception as exc:
                self.invalidate(name)
                self.db.audit_finish(audit_id, outcome="failed", message=f"deleted {done} then failed: {exc}"[:500],
                                     after={"versions": sorted(set(before["versions"]) - set(done))})
                raise
            self.invalidate(name)
            self.db.audit_finish(audit_id, outcome="ok", after={"versions": kept, **self._state(snap)})
        log.info("model_versions_deleted", model=name, versions=delete)
        return CleanupResult(delete, kept, protected, False, audit_id)

    # ---- idempotency: a repeated request id returns the first result ----

    def _replay(self, action: str, request_id: str, name: str) -> PromotionResult | None:
        raw = self.db.remembered(action, request_id)
        if raw is None:
            return None
        data = json.loads(raw)
        if data.get("name") != name:
            raise InvalidArgumentError(f"request_id {request_id!r} was already used for another request",
                                       field="request_id")
        snap = self.snapshot(name, fresh=True)
        return PromotionResult(snap.version(data["version"]), data["previous"], data["archived"], data["audit"])

    def _remember(self, action: str, request_id: str, result: PromotionResult) -> None:
        self.db.remember(action, request_id, json.dumps({
            "name": result.version.name, "version": result.version.version, "previous": result.previous_version,
            "archived": result.archived_versions, "audit": result.audit_event_id}).encode())

    # ---- audit ----

    def audit_events(self, size: int, token: str, model_name: str, actor: str,
                     start_ms: int | None, end_ms: int | None) -> Page:
        size = page_size(size)
        query = ("audit", model_name, actor, start_ms, end_ms)
        last = decode_token(token, query)
        if last is not None and (len(last) != 1 or not isinstance(last[0], int)):
            raise InvalidArgumentError("page_token is invalid", field="page_token")
        rows: list[AuditRecord] = self.db.audit_page(
            limit=size + 1, before_seq=last[0] if last else None, model_name=model_name, actor=actor,
            start_ms=start_ms, end_ms=end_ms)
        page = rows[:size]
        next_token = encode_token([page[-1].sequence], query) if len(rows) > size else ""
        return Page(page, next_token, -1)


def _with_counts(model: RegisteredModel, versions: list[ModelVersion]) -> RegisteredModel:
    return RegisteredModel(model.name, model.description, model.create_time_ms, model.update_time_ms,
                           model.aliases, len(versions), max((v.version for v in versions), default=0))


def _parse_order_by(order_by: str) -> tuple[str, bool | None]:
    """(field, descending); descending None means the field's natural order."""
    text = " ".join(order_by.split()).lower() if order_by else "version"
    parts = text.split(" ")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] not in ("asc", "desc")):
        raise InvalidArgumentError(f"order_by {order_by[:60]!r} must be '<field> [asc|desc]'", field="order_by")
    field_name = parts[0]
    if field_name not in ("version", "create_time") and not (
            field_name.startswith("metric.") and _METRIC_RE.match(field_name[len("metric."):] or "-")):
        raise InvalidArgumentError(
            f"order_by field {field_name[:60]!r} is unknown; use version, create_time or metric.<name>",
            field="order_by")
    descending = None if len(parts) == 1 else parts[1] == "desc"
    return field_name, descending


def _version_sort_key(field_name: str, descending: bool | None) -> Callable[[ModelVersion], tuple[Any, ...]]:
    if field_name == "version":
        desc = True if descending is None else descending
        return lambda v: ((-v.version if desc else v.version),)
    if field_name == "create_time":
        desc = True if descending is None else descending
        sign = -1 if desc else 1
        return lambda v: (sign * v.create_time_ms, sign * v.version)
    metric = field_name[len("metric."):]
    desc = higher_is_better(metric) if descending is None else descending
    sign = -1.0 if desc else 1.0

    def key(v: ModelVersion) -> tuple[Any, ...]:
        value = v.metrics.get(metric, math.nan)
        if math.isnan(value):
            return (1, 0.0, -v.version)  # versions without the metric come last
        return (0, sign * value, -v.version)

    return key
