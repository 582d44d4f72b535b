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

import gc
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from aqimodels.client.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ModelNotFoundError,
    StaleVersionError,
    VersionNotFoundError,
)
from aqimodels.client.domain import (
    MAX_NAME_LENGTH,
    METRIC_NAME_RE,
    Caller,
    validate_metric,
    validate_name,
    validate_version,
)
from aqimodels.server.approvals import Approvals, PromotionRequest, on_committed
from aqimodels.server.changes import Changes, Outcome, Plan, Write
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
from aqimodels.server import promotion_policy
from aqimodels.server.paging import MAX_PAGE_SIZE, SortedIndex, decode_token, encode_token, page_size, paginate

log = structlog.get_logger(__name__)

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
    def load_concurrency(self) -> int: ...
    def set_alias(self, name: str, alias: str, version: int) -> None: ...
    def delete_alias(self, name: str, alias: str) -> None: ...
    def set_tag(self, name: str, version: int, key: str, value: str) -> None: ...
    def delete_tag(self, name: str, version: int, key: str) -> None: ...
    def delete_version(self, name: str, version: int) -> None: ...
    def terminate_run(self, run_id: str, status: str) -> None: ...


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
    not_comparable: frozenset[int] = frozenset()  # evaluated on other test data than the ranked ones
    reference_dataset: str = ""


@dataclass(frozen=True)
class PromotionResult:
    version: ModelVersion
    previous_version: int
    archived_versions: list[int]
    audit_event_id: str
    promotion_request: PromotionRequest | None = None  # set: the approval policy made it a request, nothing moved


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

    def delete_version(self, name: str, version: int) -> None:
        self.store.delete_version(name, version)

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
                versions.append(replace(v, aliases=new_aliases, tags=tags))
            else:
                versions.append(v)
        return replace(snap, model=replace(snap.model, aliases=aliases), versions=versions, orders={}, numbers={})


def _now_ms() -> int:
    return int(time.time() * 1000)


def _tag(v: ModelVersion, key: str, value: str | None) -> Write:
    """The write of tag ``key`` of version ``v`` (None: removed), with the value it replaces."""
    return Write("tag", key, v.version, to=value, was=v.tags.get(key))


class RegistryService:
    """Status, listing, comparison, promotion, rollback, cleanup and audit over a ModelStore."""

    def __init__(self, store: ModelStore, db: Database, *, cache_ttl_seconds: float = 2.0,
                 running_jobs: Callable[[], dict[str, list[Any]]] | None = None,
                 full_refresh_seconds: float = 30.0, health_max_age_seconds: float = 5.0,
                 reconcile_after_seconds: float = 30.0, fault_point: str = "",
                 approvals: Approvals | None = None) -> None:
        self.store = store
        self.db = db
        self.approvals = approvals or Approvals(db)  # two-person approval of production (server/approvals.py)
        # promotions, rollbacks, archives and cleanups: one recoverable skeleton (server/changes.py)
        self.changes = Changes(db, store, lambda: _Writes(store), reconcile_after_seconds=reconcile_after_seconds,
                               fault_point=fault_point, on_recovered=self.invalidate,
                               on_committed=on_committed(self.approvals))
        self.cache_ttl = cache_ttl_seconds
        self.full_refresh = full_refresh_seconds
        self.health_max_age = health_max_age_seconds
        self._cache = _Cache()
        self._cache_lock = threading.Lock()
        self._running_jobs = running_jobs or dict
        self._degraded: set[str] = set()
        self._health: tuple[float, BackendHealth] | None = None
        self._load_cost: dict[str, float] = {}  # seconds of the last full load, per model ("" = model list)
        self._load_total = 0.0  # their sum
        self._loading: dict[str, threading.Lock] = {}  # one load per model at a time (see _load)
        self._stop_refresh = threading.Event()
        self._refresher: threading.Thread | None = None
        # Write generations: a load that overlapped a write (or an invalidation) is not cached.
        self._gen: dict[str, int] = {}
        self._gen_all = 0
        # Warm: every model the store listed is loaded (readiness waits for it; see warm_up).
        self._warm = False
        self._warm_listeners: list[Callable[[bool], None]] = []

    # ---- read model ----

    def invalidate(self, name: str | None = None) -> None:
        """Drops cached state (one model, or everything) after a write.

        Everything dropped (the store came back after an outage): the read model is cold again
        until the refresher's next warm-up.
        """
        with self._cache_lock:
            self._cache.models = None
            if name is None:
                self._gen_all += 1
                self._cache.snapshots.clear()
            else:
                self._gen[name] = self._gen.get(name, 0) + 1
                self._cache.snapshots.pop(name, None)
        if name is None:
            self._set_warm(False)

    @property
    def warm(self) -> bool:
        """Every registered model is in the read model: reads answer from memory."""
        return self._warm

    def on_warm_change(self, listener: Callable[[bool], None]) -> None:
        """Calls ``listener(warm)`` whenever the read model turns warm or cold (readiness)."""
        self._warm_listeners.append(listener)

    def _set_warm(self, warm: bool) -> None:
        with self._cache_lock:
            changed, self._warm = warm != self._warm, warm
        if changed:
            for listener in list(self._warm_listeners):
                listener(warm)

    def warm_up(self) -> bool:
        """Loads every registered model into the read model; True when warm.

        Models load in parallel where the store allows (``load_concurrency``: its own session per
        load on SQL stores), progress is logged about once a second, and the read model is warm
        only when no invalidation of everything came during the load. Raises when the store fails.
        """
        started = time.monotonic()
        with self._cache_lock:
            gen_all = self._gen_all
        models = self._load_models()
        parallel = max(1, min(len(models), self.store.load_concurrency()))
        log.info("read_model_warmup_started", models=len(models), parallel=parallel)
        loaded = versions = 0
        last_log = started
        pool = ThreadPoolExecutor(parallel, thread_name_prefix="read-model-warmup")
        try:
            futures = [pool.submit(self._load, m.name, fresh=False) for m in models]
            for future in as_completed(futures):
                if self._stop_refresh.is_set():
                    return False
                try:
                    versions += len(future.result().versions)
                except ModelNotFoundError:  # deleted since it was listed: nothing to warm
                    pass
                loaded += 1
                now = time.monotonic()
                if now - last_log >= 1.0 and loaded < len(models):
                    last_log = now
                    log.info("read_model_warmup_progress", models_loaded=loaded, models=len(models),
                             versions=versions, seconds=round(now - started, 2))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._cache_lock:
            if self._gen_all != gen_all:  # everything was dropped meanwhile: not warm, try again
                return False
        # The model list and the first models loaded were read more than a bound ago on a large
        # registry: confirmed now in one probe, or the first GetStatus after SERVING read the
        # model list and probed those models inline (30-160 ms at 4 x 10,000 on a busy machine).
        self.refresh_once()
        # The read model's objects live until replaced: out of the cyclic collector's sight, or
        # its first full pass after readiness walks them all (a million objects at 4 x 10,000:
        # the first GetStatus after SERVING took 40-90 ms). Reference counting still frees them.
        gc.freeze()
        self._set_warm(True)
        log.info("read_model_warm", models=len(models), versions=versions,
                 seconds=round(time.monotonic() - started, 2))
        return True

    def _generation(self, name: str) -> tuple[int, int]:
        with self._cache_lock:
            return self._gen_all, self._gen.get(name, 0)

    def _bump(self, name: str) -> None:
        with self._cache_lock:
            self._gen[name] = self._gen.get(name, 0) + 1

    def _full_refresh_after(self, key: str) -> float:
        """Seconds between full reloads of a model: ``full_refresh_seconds``, stretched so that
        reloading every model stays under 2.5% of one core, and spread by up to half as much
        again by name (a warm-up loads every model at once: their reloads would come in a burst).

        Stretched by the whole registry's load time, not the model's own: at 400 models of 25
        versions each load is 5 ms, the whole registry 2 s.
        """
        spread = 1.0 + (zlib.crc32(key.encode()) % 1000) / 2000
        return spread * max(self.full_refresh, 40 * self._load_total)

    def _cost(self, key: str, seconds: float) -> None:
        with self._cache_lock:
            self._load_total += seconds - self._load_cost.get(key, 0.0)
            self._load_cost[key] = seconds

    def _models_ttl(self) -> float:
        # The model list comes from MLflow's search, which loads every version of every model:
        # refreshed every cache_ttl while that costs under a tenth of the interval, else less often.
        return max(self.cache_ttl, 10 * self._load_cost.get("", 0.0))

    def _load_models(self) -> list[RegisteredModel]:
        started = time.monotonic()
        models = self.store.list_models()
        self._cost("", time.monotonic() - started)
        with self._cache_lock:
            if self._cache.models is None or self._cache.models[0] < started:
                self._cache.models = (started, models)
        return models

    def _models(self, max_age: float | None = None) -> list[RegisteredModel]:
        with self._cache_lock:
            cached = self._cache.models
        ttl = self._models_ttl() if max_age is None else max_age
        if cached and time.monotonic() - cached[0] < ttl:
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
        snap = ModelSnapshot(model=_with_counts(model, versions), versions=versions, loaded_at=started,
                             checked_at=started)
        snap._by_number()  # the index by number built here, not in the first request after the load
        self._cost(name, time.monotonic() - started)
        return self._put(snap, gen)

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
            failures = 0
            while not self._stop_refresh.is_set():
                if not self._warm:  # at start, and after the store came back: load every model once
                    try:
                        if self.warm_up():
                            failures = 0
                            continue
                    except Exception as exc:  # noqa: BLE001 - the store is down: retried, requests load on demand
                        failures += 1
                        (log.warning if failures == 1 else log.debug)(
                            "read_model_warmup_failed", error=str(exc)[:200], attempt=failures)
                    if self._stop_refresh.wait(min(5.0, 0.5 * failures)):
                        return
                    continue
                if self._stop_refresh.wait(interval):
                    return
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

    def status(self, size: int = 0, token: str = "", names: Iterable[str] = (),
               prefix: str = "") -> tuple[Page, BackendHealth]:
        """Every model's status, by name: one page of ``size`` (0: all) after ``token``, only the
        models in ``names`` (if any; a name not registered is NOT_FOUND) whose name starts with
        ``prefix``. A page of views (ModelStatusView) and the store's health."""
        if size < 0:
            raise InvalidArgumentError(f"page_size must not be negative, got {size}", field="page_size")
        size = min(size, MAX_PAGE_SIZE)
        wanted = sorted({validate_name(n, "names") for n in names})
        if len(prefix) > MAX_NAME_LENGTH:
            raise InvalidArgumentError(f"name_prefix is longer than {MAX_NAME_LENGTH} characters",
                                       field="name_prefix")
        query = ("status", wanted, prefix)
        decode_token(token, query)  # a bad token is INVALID_ARGUMENT even while the store is down
        health = self.last_health()
        if not health.healthy:
            return Page([], "", 0), health
        models = [m.name for m in self._models()]
        jobs = self._running_jobs()
        if any(n not in models for n in jobs):
            # A job (of any replica) for a model this replica's list does not know yet: the list is
            # older than the job's first version; read it again (at most every 0.2 s) so that
            # status and the job tables give one answer.
            models = [m.name for m in self._models(max_age=0.2)]
        if wanted:
            known = set(models)
            for name in wanted:
                if name not in known:
                    self._snapshot(name)  # registered since the list was read, else NOT_FOUND
            models = wanted
        if prefix:
            models = [n for n in models if n.startswith(prefix)]
        chosen, next_token = paginate(models, lambda n: (n,), size or len(models) or 1, token, query)
        views = [ModelStatusView(self._snapshot(n), jobs.get(n, []), n in self._degraded) for n in chosen]
        return Page(views, next_token, len(models)), health

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
        # Rank only versions evaluated on the same test rows as production (else the newest one).
        reference = promotion_policy.reference_version(chosen, snap.alias(PRODUCTION_ALIAS))
        same = promotion_policy.comparable_with(reference, chosen) if reference else set()
        other = [v for v in chosen if v.version not in same]
        chosen = [v for v in chosen if v.version in same]
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
        rows += [(v, 0, v.metrics.get(metric, math.nan), math.nan) for v in other]
        return Comparison(name, metric, hib, rows, with_value[0][0].version if with_value else 0, names,
                          frozenset(v.version for v in other),
                          promotion_policy.dataset_label(reference) if reference else "")

    # ---- mutations ----

    def _state(self, snap: ModelSnapshot) -> dict[str, Any]:
        return {"production": snap.model.aliases.get(PRODUCTION_ALIAS),
                "staging": snap.model.aliases.get(STAGING_ALIAS)}

    def promote(self, caller: Caller, name: str, version: int, stage: Stage | None,
                expected_current: int | None, select_best_by: str = "", reason: str = "",
                allow_data_change: bool = False, approving: str = "") -> PromotionResult:
        """``approving``: the id of the promotion request this promotion is the approval of."""
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
        chosen: dict[str, Any] = {}

        def plan() -> Plan | None:
            snap = self._confirmed(name)
            number = version
            if select_best_by:
                comparison = self.compare(name, [], select_best_by)
                if not comparison.best_version:
                    raise FailedPreconditionError(f"no version of {name!r} has metric {select_best_by!r}")
                number = comparison.best_version
            target = snap.version(number)
            alias = {Stage.PRODUCTION: PRODUCTION_ALIAS, Stage.STAGING: STAGING_ALIAS}.get(stage)
            current = snap.model.aliases.get(alias, 0) if alias else 0
            if approving:  # closed, expired or stale: refused (and closed so), nothing moves
                self.approvals.recheck(approving, current, caller.name, caller.role, caller.request_id)
            if expected_current is not None and expected_current != current:
                raise StaleVersionError(
                    f"{stage.name.lower()} of {name!r} is "
                    f"{'version ' + str(current) if current else 'empty'}, not the expected "
                    f"{'version ' + str(expected_current) if expected_current else 'empty'}; "
                    "read the status again and retry")
            if target.stage == stage:
                raise FailedPreconditionError(f"version {number} of {name!r} is already {stage.name.lower()}")
            if target.stage == Stage.PRODUCTION:
                raise FailedPreconditionError(
                    f"version {number} of {name!r} is in production; promote another version to "
                    "production or roll back first")
            if stage == Stage.PRODUCTION and current and not allow_data_change:
                change = promotion_policy.data_change(target, snap.version(current))
                if change:  # another station set or target never replaces production silently
                    raise FailedPreconditionError(
                        promotion_policy.data_change_message(name, target, snap.version(current), change))
            if stage == Stage.PRODUCTION and not approving and self.approvals.required(name):
                chosen.update(snap=snap, request=self.approvals.create(
                    caller.name, caller.role, caller.request_id, name, number, current, reason, allow_data_change,
                    {"name": name, "version": number, "previous": current, "archived": []}))
                return None
            now = tag_time(_now_ms())
            staging = snap.model.aliases.get(STAGING_ALIAS)
            archived: list[int] = []
            pre: list[Write] = []
            post: list[Write] = []
            if stage == Stage.PRODUCTION:
                if current and current != number:
                    pre.append(_tag(target, PREVIOUS_PRODUCTION_TAG, str(current)))
                    post += [_tag(snap.version(current), ARCHIVED_TAG, "true"),
                             _tag(snap.version(current), ARCHIVED_TIME_TAG, now)]
                    archived.append(current)
                commit = Write("alias", PRODUCTION_ALIAS, to=str(number), was=str(current) if current else None)
                if staging == number:
                    post.append(Write("alias", STAGING_ALIAS, to=None, was=str(number)))
                post.append(_tag(target, PROMOTED_TIME_TAG, now))
                if target.stage == Stage.ARCHIVED:
                    post.append(_tag(target, ARCHIVED_TAG, None))
            elif stage == Stage.STAGING:
                commit = Write("alias", STAGING_ALIAS, to=str(number), was=str(staging) if staging else None)
                if target.stage == Stage.ARCHIVED:
                    post.append(_tag(target, ARCHIVED_TAG, None))
            else:
                if target.stage == Stage.STAGING:
                    commit = Write("alias", STAGING_ALIAS, to=None, was=str(number))
                    post.append(_tag(target, ARCHIVED_TAG, "true"))
                else:
                    commit = _tag(target, ARCHIVED_TAG, "true")
                post.append(_tag(target, ARCHIVED_TIME_TAG, now))
            chosen.update(snap=snap, version=number, current=current, archived=archived)
            planned = self._state(snap)
            if stage == Stage.PRODUCTION:
                planned.update(production=number, staging=None if staging == number else staging)
            elif stage == Stage.STAGING:
                planned["staging"] = number
            elif staging == number:
                planned["staging"] = None
            self._bump(name)
            result: dict[str, Any] = {"name": name, "version": number, "previous": current, "archived": archived}
            if approving:  # closes the request once the promotion stands (server/approvals.py: on_committed)
                result["approval"] = {"request": approving, "by": caller.name, "role": caller.role,
                                      "reason": reason, "request_id": caller.request_id}
                planned["promotion_request"] = approving
            return Plan("PromoteModelVersion", name, number, pre + [commit] + post, commit=len(pre),
                        before=self._state(snap), after=planned, result=result,
                        message=f"{stage.name.lower()}" + (f" (approval of promotion request {approving})"
                                                           if approving else "") + (f": {reason}" if reason else ""))

        outcome = self._change(caller, "PromoteModelVersion", name, plan, chosen)
        requested = chosen.get("request")
        if requested is None and outcome.outcome == "replayed" and "promotion_request" in outcome.result:
            requested = self.approvals.get(outcome.result["promotion_request"])
        if requested is not None:
            return PromotionResult(self.snapshot(name).version(requested.version), requested.expected_current, [],
                                   requested.audit_event_id or outcome.result.get("audit", ""), requested)
        result = self._promotion_result(name, outcome, chosen)
        if outcome.outcome != "replayed":
            log.info("model_version_promoted", model=name, version=result.version.version,
                     stage=stage.name.lower(), previous=result.previous_version or None,
                     archived=result.archived_versions, outcome=outcome.outcome)
        return result

    def rollback(self, caller: Caller, name: str, expected_current: int | None, reason: str = "") -> PromotionResult:
        validate_name(name)
        chosen: dict[str, Any] = {}

        def plan() -> Plan:
            snap = self._confirmed(name)
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
            back = snap.version(previous)
            now = tag_time(_now_ms())
            writes = [Write("alias", PRODUCTION_ALIAS, to=str(previous), was=str(current)),
                      _tag(back, ARCHIVED_TAG, None), _tag(back, PROMOTED_TIME_TAG, now)]
            if snap.model.aliases.get(STAGING_ALIAS) == previous:
                writes.append(Write("alias", STAGING_ALIAS, to=None, was=str(previous)))
            writes += [_tag(prod, ARCHIVED_TAG, "true"), _tag(prod, ARCHIVED_TIME_TAG, now)]
            chosen.update(snap=snap, version=previous, current=current, archived=[current])
            staging = snap.model.aliases.get(STAGING_ALIAS)
            after: dict[str, Any] = {"production": previous, "staging": None if staging == previous else staging}
            emergency = self.approvals.required(name)  # the emergency path: no approval, and marked so
            if emergency:
                after["approval_bypassed"] = "rollback under the approval policy (the emergency path)"
            self._bump(name)
            return Plan("RollbackModel", name, previous, writes, commit=0, before=self._state(snap), after=after,
                        result={"name": name, "version": previous, "previous": current, "archived": [current]},
                        message=("emergency " if emergency else "") + f"rollback {current} -> {previous}"
                        + (" without approval (approval policy)" if emergency else "")
                        + (f": {reason}" if reason else ""))

        outcome = self._change(caller, "RollbackModel", name, plan, chosen)
        result = self._promotion_result(name, outcome, chosen)
        if outcome.outcome != "replayed":
            log.info("model_rolled_back", model=name, version=result.version.version,
                     replaced=result.previous_version, outcome=outcome.outcome)
        return result

    def approve_promotion(self, caller: Caller, request_id: str, reason: str) -> tuple[PromotionRequest,
                                                                                        PromotionResult]:
        """An admin other than the requester approves: the request's promotion is made (see promote)."""
        req = self.approvals.get(request_id)
        self.approvals.check_approver(caller.name, caller.role, req)
        result = self.promote(caller, req.model_name, req.version, Stage.PRODUCTION, req.expected_current,
                              reason=reason, allow_data_change=req.allow_data_change, approving=req.id)
        return self.approvals.get(req.id), result

    def _change(self, caller: Caller, action: str, name: str, plan: Callable[[], Plan | None],
                chosen: dict[str, Any]) -> Outcome:
        """Runs a change through the one skeleton (server/changes.py) and keeps the read model in step."""
        def finish(p: Plan, w: Any) -> dict[str, Any]:
            self._bump(name)
            after_snap = self._put(w.apply(chosen["snap"]), None) if isinstance(w, _Writes) else None
            if after_snap is None:
                self.invalidate(name)
                after_snap = self.snapshot(name, fresh=True)
            chosen["after"] = after_snap
            return {**p.after, **self._state(after_snap)}

        try:
            return self.changes.run(action=action, name=name, actor=caller.name, role=caller.role,
                                    request_id=caller.request_id, deadline=caller.deadline, plan=plan,
                                    finish=finish)
        except Exception:
            if "snap" in chosen:
                self.invalidate(name)
            raise

    def _promotion_result(self, name: str, outcome: Outcome, chosen: dict[str, Any]) -> PromotionResult:
        data = outcome.result
        if outcome.outcome == "replayed" and data.get("name") != name:
            raise InvalidArgumentError("request_id was already used for another request", field="request_id")
        snap = chosen.get("after") if outcome.outcome == "ok" else None
        if snap is None:
            snap = self.snapshot(name, fresh=True)
        return PromotionResult(snap.version(data["version"]), data["previous"], data["archived"],
                               outcome.audit_id or data.get("audit", ""))

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
        chosen: dict[str, Any] = {}

        def plan() -> Plan | None:
            snap = self.snapshot(name, fresh=True)
            aliased = {v.version for v in snap.versions if v.aliases}
            if versions:
                picked = [snap.version(validate_version(v, "versions")) for v in dict.fromkeys(versions)]
                blocked = sorted(v.version for v in picked if v.aliases)
                if blocked:
                    names = ", ".join(f"{v} ({'/'.join(snap.version(v).aliases)})" for v in blocked)
                    raise FailedPreconditionError(
                        f"cannot delete aliased version(s) {names} of {name!r}; promote or archive "
                        "other versions first")
                delete = sorted(v.version for v in picked)
            else:
                newest = {v.version for v in snap.versions[:keep_last]} if keep_last else set()
                delete = sorted(v.version for v in snap.versions
                                if v.version not in newest and v.version not in aliased
                                and (older_than_ms is None or v.create_time_ms < older_than_ms))
            kept = sorted(v.version for v in snap.versions if v.version not in delete)
            protected = sorted(aliased)
            before = {"versions": sorted(v.version for v in snap.versions), **self._state(snap)}
            chosen.update(snap=snap, result=(delete, kept, protected))
            if dry_run or not delete:
                chosen["audit"] = self.db.audit_record(
                    actor=caller.name, role=caller.role, action="CleanupModelVersions", model_name=name,
                    version=0, before=before, after={**before, "would_delete": delete},
                    outcome="dry_run" if dry_run else "ok", request_id=caller.request_id,
                    message=f"{'dry run: ' if dry_run else ''}{len(delete)} version(s) to delete")
                return None
            self._bump(name)
            return Plan("CleanupModelVersions", name, 0,
                        [Write("delete_version", version=v, to=None, was="present") for v in delete], commit=0,
                        before=before, after={"versions": kept},
                        result={"name": name, "deleted": delete, "kept": kept, "protected": protected},
                        message=f"delete {len(delete)} version(s): {delete}")

        def finish(p: Plan, _w: Any) -> dict[str, Any]:
            self.invalidate(name)
            return {**p.after, **self._state(chosen["snap"])}

        try:
            outcome = self.changes.run(action="CleanupModelVersions", name=name, actor=caller.name,
                                       role=caller.role, request_id=caller.request_id, deadline=caller.deadline,
                                       plan=plan, finish=finish)
        except Exception:
            self.invalidate(name)
            raise
        if outcome.outcome == "none":
            delete, kept, protected = chosen["result"]
            return CleanupResult(delete, kept, protected, dry_run, chosen["audit"])
        data = outcome.result
        if outcome.outcome == "replayed" and data.get("name") != name:
            raise InvalidArgumentError("request_id was already used for another request", field="request_id")
        if outcome.outcome != "replayed":
            self.invalidate(name)
            log.info("model_versions_deleted", model=name, versions=data["deleted"], outcome=outcome.outcome)
        return CleanupResult(data["deleted"], data["kept"], data["protected"], False,
                             outcome.audit_id or data.get("audit", ""))

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
            field_name.startswith("metric.") and METRIC_NAME_RE.match(field_name[len("metric."):] or "-")):
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
        order = -1 if desc else 1
        return lambda v: (order * v.create_time_ms, order * v.version)
    metric = field_name[len("metric."):]
    desc = higher_is_better(metric) if descending is None else descending
    sign = -1.0 if desc else 1.0

    def key(v: ModelVersion) -> tuple[Any, ...]:
        value = v.metrics.get(metric, math.nan)
        if math.isnan(value):
            return (1, 0.0, -v.version)  # versions without the metric come last
        return (0, sign * value, -v.version)

    return key
