"""The MLflow adapter's two read paths agree: MLflow's SQL tables on a database, MlflowClient over REST."""

from __future__ import annotations

import math
from typing import Any

import pytest

from aqimodels.client.errors import ModelNotFoundError


def _registry_through_client(store_uri: str) -> Any:
    """The adapter reading the registry through MlflowClient, as it does over REST."""
    from aqimodels.server.mlflow_store import MlflowModelStore

    store = MlflowModelStore(store_uri)
    store._sql_registry_store = lambda: None  # type: ignore[method-assign]
    return store


def test_sql_metrics_path_matches_search_runs(store_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    from aqimodels.server.mlflow_store import MlflowModelStore

    client = MlflowClient(tracking_uri=store_uri)
    exp = client.create_experiment("metrics-paths")
    finished, running, empty = (client.create_run(exp).info.run_id for _ in range(3))
    client.log_metric(finished, "rmse", 30.0, step=0)
    client.log_metric(finished, "rmse", 21.5, step=1)  # the latest value wins
    client.log_metric(finished, "r2", math.nan)
    client.log_metric(finished, "mae", 14.25)
    client.log_metric(running, "rmse", 40.0)
    client.set_terminated(finished)
    client.set_terminated(empty)
    ids = [finished, running, empty, "0" * 32]  # the last run does not exist

    sql = MlflowModelStore(store_uri)
    assert sql._sql_tracking_store() is not None
    fast = sql.run_metrics(ids)
    rest_like = MlflowModelStore(store_uri)
    rest_like._sql_tracking_store = lambda: None  # type: ignore[method-assign] # the path REST stores take
    slow = rest_like.run_metrics(ids)

    assert set(fast) == set(slow) == set(ids)
    assert fast[finished]["rmse"] == slow[finished]["rmse"] == 21.5
    assert fast[finished]["mae"] == slow[finished]["mae"] == 14.25
    assert math.isnan(fast[finished]["r2"]) and math.isnan(slow[finished]["r2"])
    assert fast[running] == slow[running] == {"rmse": 40.0}
    assert fast[empty] == slow[empty] == {}
    assert fast["0" * 32] == slow["0" * 32] == {}
    # finished runs are cached for good, a running one is read again
    client.log_metric(running, "rmse", 35.0)
    assert sql.run_metrics([running])[running] == {"rmse": 35.0}


def test_probe_all_matches_probe_model_by_model(store_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    from aqimodels.server.mlflow_store import MlflowModelStore

    client = MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)
    exp = client.create_experiment("probe")
    for name, count in (("a_model", 3), ("b_model", 2), ("empty_model", 0)):
        client.create_registered_model(name)
        for _ in range(count):
            run = client.create_run(exp).info.run_id
            client.create_model_version(name, f"runs:/{run}/model", run_id=run)
    client.set_registered_model_alias("a_model", "production", "2")
    client.set_registered_model_alias("a_model", "staging", "3")
    client.set_registered_model_alias("a_model", "champion", "1")  # not one of ours: not reported
    client.set_registered_model_alias("b_model", "production", "1")
    client.delete_model_version("b_model", "2")  # the newest live version is 1 again

    store = MlflowModelStore(store_uri)
    batch = store.probe_all()
    assert batch is not None
    rest_like = _registry_through_client(store_uri)
    assert batch == {name: store.probe(name) for name in ("a_model", "b_model", "empty_model")}
    assert batch == {name: rest_like.probe(name) for name in ("a_model", "b_model", "empty_model")}
    for s in (store, rest_like):
        with pytest.raises(ModelNotFoundError):
            s.probe("no_such_model")
    assert batch["a_model"] == ({"production": 2, "staging": 3}, 3)
    assert batch["b_model"] == ({"production": 1}, 1)
    assert batch["empty_model"] == ({}, 0)


def test_sql_model_load_matches_mlflowclient(store_uri: str) -> None:
    """The read model's load and model list from MLflow's tables equal what MlflowClient reads."""
    from mlflow.tracking import MlflowClient

    from aqimodels.server.mlflow_store import MlflowModelStore

    client = MlflowClient(tracking_uri=store_uri, registry_uri=store_uri)
    exp = client.create_experiment("load")
    client.create_registered_model("a_model", description="the first")
    client.create_registered_model("b_model")
    client.create_registered_model("empty_model")
    client.register_prompt(name="a_prompt", template="Forecast {{city}}")  # a registered model MLflow hides
    for name, count in (("a_model", 4), ("b_model", 2)):
        for i in range(count):
            run = client.create_run(exp).info.run_id
            client.log_metric(run, "rmse", 20.0 + i)
            client.set_terminated(run)
            client.create_model_version(name, f"runs:/{run}/model", run_id=run, description=f"v{i + 1}",
                                        tags={"job_id": f"job-{i}"})
    client.set_model_version_tag("a_model", "2", "aqimodels.archived", "true")
    client.set_registered_model_alias("a_model", "production", "3")
    client.set_registered_model_alias("a_model", "champion", "3")
    client.set_registered_model_alias("a_model", "staging", "4")
    client.delete_model_version("a_model", "1")
    client.delete_model_version("b_model", "2")

    sql = MlflowModelStore(store_uri)
    assert sql._sql_registry_store() is not None
    rest_like = _registry_through_client(store_uri)

    assert sql.list_models() == rest_like.list_models()
    assert [m.name for m in sql.list_models()] == ["a_model", "b_model", "empty_model"]
    for name in ("a_model", "b_model", "empty_model"):
        assert sql.load_model(name) == rest_like.load_model(name)
    # a model's first load with many runs not cached reads their metrics in one join on the model
    joined = MlflowModelStore(store_uri)
    import aqimodels.server.mlflow_store as adapter

    by_model_above = adapter._BY_MODEL_ABOVE
    adapter._BY_MODEL_ABOVE = 0
    try:
        for name in ("a_model", "b_model", "empty_model"):
            assert joined.load_model(name) == rest_like.load_model(name)
    finally:
        adapter._BY_MODEL_ABOVE = by_model_above
    model, versions = sql.load_model("a_model")
    assert model.aliases == {"production": 3, "champion": 3, "staging": 4} and model.latest_version == 4
    assert [v.version for v in versions] == [4, 3, 2]
    assert versions[1].aliases == ("champion", "production") and versions[1].metrics == {"rmse": 22.0}
    assert versions[2].tags == {"job_id": "job-1", "aqimodels.archived": "true"}
    for store in (sql, rest_like):
        with pytest.raises(ModelNotFoundError):
            store.load_model("no_such_model")
