"""Dataset specs, validation and loading (no MLflow)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.training.data import COLUMNS, load_dataset

from conftest import SHARED_DATA

BEIJING = str(SHARED_DATA)


def _frame(hours: int = 100, stations: int = 2) -> pd.DataFrame:
    times = pd.date_range("2024-01-01", periods=hours, freq="h")
    rows = []
    for s in range(stations):
        for i, t in enumerate(times):
            rows.append({"station": f"A{s}", "time": t, "pm25": 20 + 10 * np.sin(i / 5) + s,
                         "latitude": 40 + s * 0.1, "longitude": 116.0})
    return pd.DataFrame(rows)


def test_synthetic_default_is_seeded_complete_and_fast() -> None:
    import time

    t = time.perf_counter()
    a = load_dataset("synthetic")
    assert time.perf_counter() - t < 2.0
    b = load_dataset("")
    assert a.fingerprint() == b.fingerprint()
    assert list(a.frame.columns) == list(COLUMNS)
    assert len(a.stations) == 6 and a.n_hours == 90 * 24
    assert len(a.frame) == 6 * 90 * 24
    assert a.frame["pm25"].isna().any()  # a few missing values, kept as NaN
    assert a.frame["pm25"].min() > 0
    c = load_dataset("synthetic:stations=3,days=5,seed=1")
    assert len(c.stations) == 3 and c.n_hours == 120
    assert c.fingerprint() != load_dataset("synthetic:stations=3,days=5,seed=2").fingerprint()


def test_synthetic_neighbours_carry_information() -> None:
    """Transport: some station's PM2.5 correlates better with a neighbour's lagged PM2.5 than
    with its own lagged PM2.5 alone explains (the neighbour adds partial correlation)."""
    d = load_dataset("synthetic")
    pm = pd.DataFrame(d.column("pm25")).ffill().to_numpy()
    diff = np.diff(pm, axis=0)
    best = 0.0
    for j in range(pm.shape[1]):
        for i in range(pm.shape[1]):
            if i != j:
                r = np.corrcoef(diff[3:, j], diff[:-3, i])[0, 1]
                best = max(best, r)
    assert best > 0.1


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("nosuch:thing", "unknown dataset scheme"),
        ("file:/no/such/path.csv", "does not exist"),
        ("/no/such/folder", "does not exist"),
        ("synthetic:stations=abc", "must be an integer"),
        ("synthetic:colour=blue", "cannot parse synthetic"),
        ("beijing:/no/such/folder", "does not exist"),
    ],
)
def test_bad_specs(spec: str, fragment: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        load_dataset(spec)
    assert fragment in e.value.message
    assert e.value.field == "dataset"


def test_file_missing_columns_named(tmp_path) -> None:
    path = tmp_path / "d.csv"
    _frame().drop(columns=["pm25", "station"]).to_csv(path, index=False)
    with pytest.raises(InvalidArgumentError) as e:
        load_dataset(f"file:{path}")
    assert "station" in e.value.message and "pm25" in e.value.message


def test_file_without_any_pm25(tmp_path) -> None:
    path = tmp_path / "d.csv"
    _frame().assign(pm25=np.nan).to_csv(path, index=False)
    with pytest.raises(InvalidArgumentError, match=r"no PM2\.5"):
        load_dataset(str(path))


def test_file_csv_parquet_folder_and_grid(tmp_path) -> None:
    df = _frame(hours=50)
    df = df.drop(index=[3, 4])  # two absent rows become NaN rows of the complete grid
    df.to_csv(tmp_path / "a.csv", index=False)
    d = load_dataset(f"file:{tmp_path / 'a.csv'}")
    assert d.n_hours == 50 and len(d.frame) == 100
    assert d.frame["pm25"].isna().sum() == 2
    assert d.stations["latitude"].tolist() == [40.0, 40.1]
    assert d.frame["pm10"].isna().all()  # optional column absent: NaN, not zero
    folder = tmp_path / "folder"
    folder.mkdir()
    df[df.station == "A0"].to_parquet(folder / "a0.parquet")
    df[df.station == "A1"].to_csv(folder / "a1.csv", index=False)
    f = load_dataset(str(folder))
    assert f.fingerprint() == d.fingerprint()
    sliced = load_dataset(str(folder), start="2024-01-01 10:00", end="2024-01-02 00:00")
    assert sliced.n_hours == 14


def _require_beijing() -> None:
    if not os.path.isdir(BEIJING):
        if os.environ.get("CI"):
            pytest.fail(f"{BEIJING} is missing on CI")
        pytest.skip(f"the shared Beijing Multi-Site copy is not at {BEIJING}")


def test_beijing_time_slice() -> None:
    _require_beijing()
    d = load_dataset(f"beijing:{BEIJING}", start="2016-01-01", end="2016-01-08")
    assert len(d.stations) == 12 and d.n_hours == 7 * 24
    assert set(d.stations["station"]) >= {"Dongsi", "Tiantan", "Huairou"}
    row = d.stations.set_index("station").loc["Dongsi"]
    assert row["latitude"] == pytest.approx(39.929) and row["longitude"] == pytest.approx(116.417)
    assert d.frame["wind_dir"].dropna().between(0, 337.5).all()
    assert d.frame["pm25"].notna().mean() > 0.9
    # the first Dongsi hour of 2013 in the raw file: PM2.5 9, wd NNW
    first = load_dataset(f"beijing:{BEIJING}", start="2013-03-01 00:00", end="2013-03-01 01:00")
    r = first.frame.set_index("station").loc["Dongsi"]
    assert r["pm25"] == 9 and r["wind_dir"] == 337.5 and r["co"] == 300
