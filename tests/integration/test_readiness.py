"""Readiness that means ready, and GetStatus over many models.

A freshly started replica answers NOT_SERVING for the registry's own service name (what a k8s
readiness probe asks) until its read model holds every model; the process itself ("") is
SERVING as soon as the store answers (liveness). The warm-up here is the real one on a real
store, held back at the store's model load until the test lets it go.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from conftest import realistic_metrics, start_registry

SERVICE = "aqimodels.api.registry.v1.ModelRegistry"
MODELS = ("aqi_no2_r001_lstm", "aqi_pm25_r001_gnn", "aqi_pm25_r001_xgboost", "aqi_pm25_r002_lstm",
          "aqi_so2_r001_ensemble")


def _wait_for(predicate: Any, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {limit} s")
        time.sleep(0.02)


def _seed(uri: str, models: tuple[str, ...], versions: int = 2) -> None:
    from aqimodels.server.mlflow_store import MlflowModelStore

    store = MlflowModelStore(uri)
    for i, name in enumerate(models):
        for v in range(versions):
            store.create_version(name, realistic_metrics(v, seed=i))


class _HeldLoads:
    """Holds the store's real model loads until released, and counts them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from aqimodels.server.mlflow_store import MlflowModelStore

        self.release = threading.Event()
        self.loads: list[str] = []
        real = MlflowModelStore.load_model

        def held(store: Any, name: str) -> Any:
            self.loads.append(name)
            assert self.release.wait(60), "the test never released the load"
            return real(store, name)

        monkeypatch.setattr(MlflowModelStore, "load_model", held)


def test_a_replica_is_not_ready_until_its_read_model_is_warm(sqlite_uri: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _seed(sqlite_uri, MODELS)
    held = _HeldLoads(monkeypatch)
    reg = start_registry(sqlite_uri)
    client: Any = reg.client
    try:
        assert client.health() == "SERVING"  # alive: the store answers
        _wait_for(lambda: held.loads, 10, "the warm-up's first load")
        time.sleep(0.3)  # the warm-up is held: readiness must not move on its own
        assert client.health(SERVICE) == "NOT_SERVING"
        assert client.health() == "SERVING"
        assert not reg.server.service.warm  # type: ignore[attr-defined]
        held.release.set()
        _wait_for(lambda: client.health(SERVICE) == "SERVING", 30, "SERVING for the registry's service")
        # ready means warm: the first GetStatus reads no model from the store
        loads_before = len(held.loads)
        status = client.status()
        assert [m.model.name for m in status.models] == list(MODELS)
        assert all(m.latest.version == 2 for m in status.models)
        assert len(held.loads) == loads_before == len(MODELS)

        # the store came back after an outage (what the health probe does then): cold again,
        # NOT_SERVING for the service until the refresher has warmed every model again
        held.release.clear()
        reg.server.service.invalidate()  # type: ignore[attr-defined]
        assert client.health(SERVICE) == "NOT_SERVING" and client.health() == "SERVING"
        _wait_for(lambda: len(held.loads) > loads_before, 10, "the second warm-up")
        time.sleep(0.2)
        assert client.health(SERVICE) == "NOT_SERVING"
        held.release.set()
        _wait_for(lambda: client.health(SERVICE) == "SERVING", 30, "SERVING after the second warm-up")
    finally:
        held.release.set()
        client.close()
        reg.server.stop(1)  # type: ignore[attr-defined]


def test_get_status_pages_and_filters_models(sqlite_uri: str) -> None:
    from aqimodels.client.errors import InvalidArgumentError, NotFoundError

    _seed(sqlite_uri, MODELS, versions=1)
    reg = start_registry(sqlite_uri)
    client: Any = reg.client
    try:
        _wait_for(lambda: client.health(SERVICE) == "SERVING", 30, "SERVING")
        everything = client.status()  # the default is unchanged: every model, one answer
        assert [m.model.name for m in everything.models] == list(MODELS)
        assert everything.next_page_token == "" and everything.total_size == len(MODELS)

        pages, token = [], ""
        while True:
            page = client.status(page_size=2, page_token=token)
            assert page.total_size == len(MODELS) and len(page.models) <= 2
            pages.append([m.model.name for m in page.models])
            token = page.next_page_token
            if not token:
                break
        assert pages == [list(MODELS[0:2]), list(MODELS[2:4]), list(MODELS[4:])]
        assert [m.model.name for m in client.iter_status(page_size=3)] == list(MODELS)

        pm25 = client.status(name_prefix="aqi_pm25_")
        assert [m.model.name for m in pm25.models] == list(MODELS[1:4]) and pm25.total_size == 3
        chosen = client.status(names=[MODELS[4], MODELS[0], MODELS[0]])
        assert [m.model.name for m in chosen.models] == [MODELS[0], MODELS[4]]
        both = client.status(names=[MODELS[0], MODELS[1]], name_prefix="aqi_pm25_", page_size=1)
        assert [m.model.name for m in both.models] == [MODELS[1]] and both.total_size == 1
        assert both.next_page_token == ""
        assert [m.model.name for m in client.status(name_prefix="nothing_").models] == []

        with pytest.raises(NotFoundError, match="no_such_model"):
            client.status(names=["no_such_model"])
        with pytest.raises(InvalidArgumentError, match="page_size"):
            client.status(page_size=-1)
        first = client.status(page_size=2)
        with pytest.raises(InvalidArgumentError, match="page_token"):  # a token of another filter
            client.status(page_size=2, page_token=first.next_page_token, name_prefix="aqi_pm25_")
        with pytest.raises(InvalidArgumentError, match="page_token"):
            client.status(page_token="not-a-token")
    finally:
        client.close()
        reg.server.stop(1)  # type: ignore[attr-defined]


def test_the_refresher_probes_every_model_in_the_same_three_queries(sqlite_uri: str) -> None:
    """The refresher's probe of all models is a constant number of queries, whatever their count."""
    from aqimodels.server.db import Database
    from aqimodels.server.mlflow_store import MlflowModelStore
    from aqimodels.server.service import RegistryService
    from sqlalchemy import event

    store = MlflowModelStore(sqlite_uri)
    store.ping()
    db = Database(sqlite_uri)
    db.create_tables()
    service = RegistryService(store, db, cache_ttl_seconds=0.2)
    statements: list[str] = []
    engines = {id(e): e for e in (store._sql_registry_store().engine, store._sql_tracking_store().engine)}

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):  # not the driver's per-connection PRAGMAs
            statements.append(statement)

    for engine in engines.values():
        event.listen(engine, "before_cursor_execute", count)
    try:
        per_pass = []
        for models in (MODELS[:2], MODELS):
            _seed(sqlite_uri, tuple(m for m in models if m not in {v.snapshot.model.name for v in service.status()[0].items}),
                  versions=3)
            service.invalidate()
            assert service.warm_up() and service.warm
            time.sleep(0.15)  # every snapshot is due for its probe (half the bound)
            statements.clear()
            service.refresh_once()
            per_pass.append(len(statements))
            assert len(service.status()[0].items) == len(models)
        assert per_pass == [3, 3], (per_pass, statements)
    finally:
        for engine in engines.values():
            event.remove(engine, "before_cursor_execute", count)
        db.engine.dispose()
