"""The one feature pipeline: splits, scalers, missing values, inference transform."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from aqimodels.client.errors import InvalidArgumentError
from aqimodels.training.data import from_frame, load_dataset
from aqimodels.training.features import FeaturePipeline, build_features


@pytest.fixture(scope="module")
def small():
    return load_dataset("synthetic:stations=3,days=12,seed=3")


def test_shapes_and_chronological_split(small) -> None:
    fs, pipe = build_features(small, window=12, horizon=24)
    T, S = small.n_hours, 3
    n = T - 12 - 24 + 1
    assert len(fs.train) + len(fs.val) + len(fs.test) == n
    assert len(fs.test) == round(0.2 * n) and len(fs.val) == round(0.1 * n)
    assert fs.train.x.shape[1:] == (12, S, len(fs.feature_names)) and fs.train.x.dtype == np.float32
    assert fs.test.y.shape == (len(fs.test), S, 24)
    assert fs.train.last_pm25.shape == (len(fs.train), S)
    assert fs.train.times.max() < fs.val.times.min() <= fs.val.times.max() < fs.test.times.min()
    assert fs.test.times[-1] == small.times[-1 - 24]
    assert "pm25" in fs.feature_names and "pm25_missing" in fs.feature_names
    assert {"wind_u", "wind_v", "hour_sin", "doy_cos"} <= set(fs.feature_names)
    # targets are the raw future PM2.5 (NaN kept), not scaled or filled
    raw = small.column("pm25")
    t0 = int(np.searchsorted(small.times, fs.test.times[0]))
    np.testing.assert_array_equal(fs.test.y[0], raw[t0 + 1:t0 + 25].T.astype(np.float32))
    assert np.isnan(fs.train.y).any() or np.isnan(fs.test.y).any() or np.isnan(fs.val.y).any()
    assert not np.isnan(fs.train.x).any()  # inputs are imputed ...
    p = fs.feature_names.index("pm25")
    assert not np.any(fs.train.x[..., p] == (0 - pipe.mean[p]) / pipe.std[p])  # ... but never with zeros


def test_scaler_fitted_on_training_rows_only(small) -> None:
    fs, pipe = build_features(small, window=12)
    last_train_hour = int(np.searchsorted(small.times, fs.train.times[-1])) + 1
    p = fs.feature_names.index("pm25")
    # changing the data AFTER the training hours must not move the scaler
    frame = small.frame.copy()
    late = frame["time"] >= small.times[last_train_hour]
    frame.loc[late, "pm25"] *= 10
    _, pipe2 = build_features(from_frame(frame, stations=small.stations), window=12)
    assert pipe2.mean[p] == pytest.approx(pipe.mean[p])
    assert pipe2.std[p] == pytest.approx(pipe.std[p])
    assert pipe.medians == pipe2.medians
    # and it is the training-hours statistic (train inputs roughly standardised)
    xp = fs.train.x[:, -1, :, p]
    assert abs(float(xp.mean())) < 0.3 and 0.7 < float(xp.std()) < 1.3


def test_missing_values_explicit() -> None:
    times = pd.date_range("2024-01-01", periods=200, freq="h")
    pm = 30 + 10 * np.sin(np.arange(200) / 4)
    pm[50:53] = np.nan  # short gap: carried forward
    pm[100:120] = np.nan  # long gap: first 6 h carried forward, then the training median
    df = pd.DataFrame({"station": "X", "time": times, "pm25": pm, "temp": 5.0})
    data = from_frame(df)
    _, pipe = build_features(data, window=24)
    feats, raw, last, _ = pipe.features(data)
    p, miss = pipe.feature_names.index("pm25"), pipe.feature_names.index("pm25_missing")
    unscale = feats[:, 0, p] * pipe.std[p] + pipe.mean[p]
    assert unscale[51] == pytest.approx(pm[49], abs=1e-3)
    assert unscale[105] == pytest.approx(pm[99], abs=1e-3)
    assert unscale[110] == pytest.approx(pipe.medians["pm25"][0], abs=1e-3)
    assert feats[110, 0, miss] == 1 and feats[10, 0, miss] == 0
    assert np.isnan(raw[110, 0])  # targets stay NaN
    assert last[110, 0] == pytest.approx(pm[99], abs=1e-4)  # persistence: last observed
    assert "pm10" not in pipe.feature_names  # absent optional column: not a feature


def test_too_few_hours_message(small) -> None:
    short = small.slice(end=small.times[40])
    with pytest.raises(InvalidArgumentError) as e:
        build_features(short, window=24, horizon=24)
    assert "40 hours" in e.value.message and "67" in e.value.message and e.value.field == "dataset"


def test_pipeline_json_roundtrip_and_inference_transform(small) -> None:
    fs, pipe = build_features(small, window=12)
    again = FeaturePipeline.from_dict(json.loads(json.dumps(pipe.to_dict())))
    assert again == pipe
    x, times = again.transform(small)
    assert x.shape == (1, 12, 3, len(pipe.feature_names)) and times[0] == small.times[-1]
    xa, ta = again.transform(small, all_origins=True)
    # the windows for the test origins are exactly the training-time inputs
    idx = np.searchsorted(ta, fs.test.times)
    np.testing.assert_array_equal(xa[idx], fs.test.x)
    _, wy, _, _ = again.windows_for(small)
    np.testing.assert_array_equal(wy[idx], fs.test.y)
    # station order is the pipeline's, whatever the input order; missing station -> error
    with pytest.raises(InvalidArgumentError, match="lacks station"):
        again.transform(from_frame(small.frame[small.frame.station != "S02"]))


def test_stride_and_large_views(small) -> None:
    fs, _ = build_features(small, window=12, stride=3)
    fs1, _ = build_features(small, window=12, stride=1)
    np.testing.assert_array_equal(fs.train.times, fs1.train.times[::3])
    np.testing.assert_array_equal(fs.train.x, fs1.train.x[::3])
