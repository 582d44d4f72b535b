"""Promotion and comparison decide only on numbers from the same test rows; ensembles combine the
members of their own request (issue 12). A real registry, a real worker process, real trainings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Registry, registry_with_worker

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client import FailedPreconditionError, InvalidArgumentError

FAST = wpb.TrainParams(max_epochs=3, window_hours=12)
HOME = "synthetic:stations=4,days=20,seed=3"
SAME_STATIONS_OTHER_DATA = "synthetic:stations=4,days=20,seed=9"
FEWER_STATIONS = "synthetic:stations=3,days=20,seed=3"
NAME = "aqi_predictor_xgboost"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, _sqlite_template: Path) -> Iterator[Registry]:
    yield from registry_with_worker(tmp_path_factory.mktemp("like-for-like"), _sqlite_template)


def _retrain(reg: Registry, types: list[str], dataset: str, **kw: object) -> dict[int, pb.RetrainEvent]:
    events = list(reg.client.retrain(types, dataset=dataset, params=FAST, **kw))  # type: ignore[attr-defined]
    last: dict[str, pb.RetrainEvent] = {}
    first: dict[str, pb.RetrainEvent] = {}
    for ev in events:
        first.setdefault(ev.job_id, ev)
        last[ev.job_id] = ev
    out = {first[j].model_type: ev for j, ev in last.items()}
    for t, ev in out.items():
        assert ev.WhichOneof("event") == "succeeded", (t, ev)
    return out


def test_auto_promotion_decides_on_the_challengers_rows_and_refuses_another_station_set(system: Registry) -> None:
    c = system.client  # type: ignore[attr-defined]
    home = _retrain(system, ["xgboost"], HOME, auto_promote=True)[wpb.MODEL_TYPE_XGBOOST].succeeded
    assert home.promotion.promoted and home.promotion.reason == "no version was in production"
    v_home = home.version.version

    # same stations, other data: production is scored by the worker on the challenger's test rows
    other = _retrain(system, ["xgboost"], SAME_STATIONS_OTHER_DATA, auto_promote=True)[wpb.MODEL_TYPE_XGBOOST].succeeded
    d = other.promotion
    mv = c.get_version(NAME, other.version.version)
    assert mv.tags["champion.version"] == str(v_home)
    assert d.production_version == v_home
    assert d.production_value == pytest.approx(mv.metrics["champion_rmse"])  # the same rows ...
    assert d.production_value != pytest.approx(c.get_version(NAME, v_home).metrics["rmse"])  # ... not its own
    assert d.candidate_value == pytest.approx(mv.metrics["rmse"])
    assert "scored on the same rows" in d.reason and SAME_STATIONS_OTHER_DATA in d.evaluated_on
    decision = json.loads(mv.tags["aqimodels.promotion_decision"])
    assert decision["evaluated_on"] == d.evaluated_on and decision["production"] == pytest.approx(d.production_value)

    production = c.status()
    prod_version = next(m.production.version for m in production.models if m.model.name == NAME)

    # another station set: never replaces production without allow_data_change
    fewer = _retrain(system, ["xgboost"], FEWER_STATIONS, auto_promote=True)[wpb.MODEL_TYPE_XGBOOST].succeeded
    assert not fewer.promotion.promoted
    assert "station set differs (lacks S04)" in fewer.promotion.reason and "allow_data_change" in fewer.promotion.reason
    assert next(m.production.version for m in c.status().models if m.model.name == NAME) == prod_version

    # ... nor by hand: FAILED_PRECONDITION naming the difference; explicitly allowed, it moves
    with pytest.raises(FailedPreconditionError, match=r"station set differs \(lacks S04\)"):
        c.promote(NAME, fewer.version.version, "production")
    c.promote(NAME, fewer.version.version, "production", allow_data_change=True)
    assert c.get_version(NAME, fewer.version.version).stage == pb.STAGE_PRODUCTION

    # compare ranks only the versions on production's test rows; the others are listed, marked
    resp = c.compare(NAME)
    rows = {r.version.version: r for r in resp.versions}
    assert rows[fewer.version.version].comparable and rows[fewer.version.version].rank == 1
    assert resp.best_version == fewer.version.version
    for v in (v_home, other.version.version):
        assert not rows[v].comparable and rows[v].rank == 0 and "test" in rows[v].dataset
    assert FEWER_STATIONS in resp.reference_dataset


def test_an_ensemble_combines_the_members_of_its_own_request_and_records_them(system: Registry) -> None:
    c = system.client  # type: ignore[attr-defined]
    # production xgboost on the home data; retrain xgboost + ensemble on other data in one request
    out = _retrain(system, ["xgboost", "ensemble"], SAME_STATIONS_OTHER_DATA)
    member = out[wpb.MODEL_TYPE_XGBOOST].succeeded.version.version
    ens = c.get_version("aqi_predictor_ensemble", out[wpb.MODEL_TYPE_ENSEMBLE].succeeded.version.version)
    assert ens.lineage.members == [f"{NAME}:{member}"]  # this request's member, not production's
    assert ens.tags["ensemble.members"] == f"{NAME}:{member}"
    assert ens.lineage.dataset == SAME_STATIONS_OTHER_DATA and ens.lineage.code_version
    assert ens.lineage.run_id == ens.run_id and ens.lineage.test_key and ens.lineage.stations == "S01,S02,S03,S04"
    # alone, on data its production members were not trained on: refused, naming them
    with pytest.raises(InvalidArgumentError, match=r"member\(s\) aqi_predictor_xgboost v\d+ .* other data"):
        _retrain(system, ["ensemble"], HOME)


def test_a_retrain_names_its_target_and_refuses_an_unknown_one_before_any_job(system: Registry) -> None:
    c = system.client  # type: ignore[attr-defined]
    before = len(c.list_jobs(page_size=1000).jobs)
    with pytest.raises(InvalidArgumentError, match=r"dataset\.target 'so4'"):
        _retrain(system, ["xgboost"], HOME, target="so4")
    assert len(c.list_jobs(page_size=1000).jobs) == before
    out = _retrain(system, ["xgboost"], HOME, target="no2")[wpb.MODEL_TYPE_XGBOOST].succeeded
    assert out.version.name == "aqi_predictor_xgboost_no2" and out.version.lineage.target == "no2"
