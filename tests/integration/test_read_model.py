"""The registry's read model: fast reads from memory, never staler than ``cache_ttl_seconds``.

A change made by another writer (a plain MlflowClient, another replica) shows in GetStatus within
the bound; a change made through this registry shows at once (read-your-writes).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from conftest import realistic_metrics, start_registry

TTL = 1.0
SLACK = 0.3  # one RPC and the scheduler on a busy 2-core machine
NAME = "aqi_predictor_lstm"


def _production(client: Any, name: str = NAME) -> int:
    for m in client.status().models:
        if m.model.name == name:
            return int(m.production.version)
    return 0


def _wait_until(predicate: Any, limit: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit:
            raise AssertionError(f"not seen within {limit:.1f} s")
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_change_by_another_writer_shows_in_get_status_within_the_bound(sqlite_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    reg = start_registry(sqlite_uri, cache_ttl_seconds=TTL)
    client = reg.client
    try:
        versions = reg.seed(NAME, [realistic_metrics(i) for i in range(4)])
        client.promote(NAME, versions[0], "production")  # type: ignore[attr-defined]
        assert _production(client) == versions[0]
        other = MlflowClient(tracking_uri=sqlite_uri)
        seen = []
        for v in (versions[1], versions[2], versions[3]):
            time.sleep(0.37)  # land at different points of the refresh cycle
            other.set_registered_model_alias(NAME, "production", str(v))
            seen.append(_wait_until(lambda v=v: _production(client) == v, TTL + 5))
        assert max(seen) <= TTL + SLACK, f"production changed by another writer showed after {seen} s (bound {TTL} s)"
        # a version registered by another writer shows within the bound too
        new = reg.store.create_version(NAME, realistic_metrics(9))  # type: ignore[attr-defined] # not seed: it tells the read model
        took = _wait_until(lambda: any(x.version == new for x in client.list_versions(NAME).versions),  # type: ignore[attr-defined]
                           TTL + 5)
        assert took <= TTL + SLACK, took
    finally:
        client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]


def test_get_status_right_after_a_promotion_through_the_registry_shows_it(sqlite_uri: str) -> None:
    reg = start_registry(sqlite_uri, cache_ttl_seconds=60.0)  # a long bound: only read-your-writes can explain it
    client = reg.client
    try:
        a, b, c = reg.seed(NAME, [realistic_metrics(i) for i in range(3)])
        client.status()  # the read model holds the model now
        for version, previous in ((a, 0), (b, a), (a, b), (b, a)):
            client.promote(NAME, version, "production")  # type: ignore[attr-defined]
            assert _production(client) == version
            stages = {v.version: v.stage for v in client.list_versions(NAME).versions}  # type: ignore[attr-defined]
            from aqimodels.api.registry.v1 import registry_pb2 as pb

            assert stages[version] == pb.STAGE_PRODUCTION
            if previous:
                assert stages[previous] == pb.STAGE_ARCHIVED
        client.promote(NAME, c, "staging")  # type: ignore[attr-defined]
        status = next(m for m in client.status().models if m.model.name == NAME)
        assert status.staging.version == c and status.production.version == b
        client.rollback(NAME)  # type: ignore[attr-defined]
        assert _production(client) == a
    finally:
        client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]


def test_a_promotion_on_one_replica_shows_on_another_within_the_bound(sqlite_uri: str) -> None:
    a = start_registry(sqlite_uri, cache_ttl_seconds=TTL)
    b = start_registry(sqlite_uri, cache_ttl_seconds=TTL)
    try:
        v1, v2 = a.seed(NAME, [realistic_metrics(1), realistic_metrics(2)])
        a.client.promote(NAME, v1, "production")  # type: ignore[attr-defined]
        _wait_until(lambda: _production(b.client) == v1, TTL + 5)
        a.client.promote(NAME, v2, "production")  # type: ignore[attr-defined]
        took = _wait_until(lambda: _production(b.client) == v2, TTL + 5)
        assert took <= TTL + SLACK, took
        archived = {v.version: v.stage for v in b.client.list_versions(NAME).versions}  # type: ignore[attr-defined]
        from aqimodels.api.registry.v1 import registry_pb2 as pb

        assert archived[v1] == pb.STAGE_ARCHIVED  # the replica reloaded the tags with the alias
    finally:
        for reg in (a, b):
            reg.client.close()  # type: ignore[attr-defined]
            reg.server.stop(1)  # type: ignore[attr-defined]


def test_concurrent_cold_reads_of_a_model_share_one_load(sqlite_uri: str) -> None:
    """At start the refresher's warm-up and the first requests all want every model: one load each."""
    from aqimodels.server.db import Database
    from aqimodels.server.mlflow_store import MlflowModelStore
    from aqimodels.server.service import RegistryService

    store = MlflowModelStore(sqlite_uri)
    store.ping()
    for i in range(3):
        store.create_version(NAME, realistic_metrics(i))
    loads: list[str] = []
    real = store.load_model

    def slow_load(name: str) -> Any:  # the real load, slowed so the other readers arrive during it
        loads.append(name)
        time.sleep(0.3)
        return real(name)

    store.load_model = slow_load  # type: ignore[method-assign]
    db = Database(sqlite_uri)
    db.create_tables()
    service = RegistryService(store, db, cache_ttl_seconds=60.0)
    results: list[Any] = []
    readers = [threading.Thread(target=lambda: results.append(service.snapshot(NAME))) for _ in range(4)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(30)
    assert loads == [NAME] and len(results) == 4
    assert all(r is results[0] for r in results)
    assert [v.version for v in results[0].versions] == [3, 2, 1]
    # a load asked for after a write does not reuse the snapshot read before it
    store.create_version(NAME, realistic_metrics(4))
    service.invalidate(NAME)
    assert [v.version for v in service.snapshot(NAME).versions] == [4, 3, 2, 1] and loads == [NAME, NAME]
    db.engine.dispose()
