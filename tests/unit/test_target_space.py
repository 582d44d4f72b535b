"""The log1p training space: exact inversion, the bound below, the cap, and its checks."""

from __future__ import annotations

import numpy as np
import pytest
from aqimodels.training.runtime.target_space import (
    check_transform,
    fit_log_scale,
    from_log_change,
    log_change,
    origin_values,
)


def test_the_log_change_inverts_exactly_to_micrograms() -> None:
    rng = np.random.default_rng(0)
    y = rng.gamma(2.0, 40.0, size=(50, 3, 24))
    origin = rng.gamma(2.0, 40.0, size=(50, 3))
    scale = fit_log_scale(y, origin)
    assert 0.1 < scale < 5
    back = from_log_change(log_change(y, origin) / scale, origin, scale)
    np.testing.assert_allclose(back, y, rtol=1e-5, atol=1e-3)


def test_whatever_the_model_outputs_the_forecast_stays_above_minus_one_and_below_the_ceiling() -> None:
    origin = np.array([[0.0, 3.0, 461.0]])
    z = np.array([-1e6, -50.0, 0.0, 50.0, 1e6])[None, None, :].repeat(3, axis=1)
    out = from_log_change(z, origin, 0.7)
    assert np.isfinite(out).all()
    assert (out >= -1.0).all() and (out <= 1500.0 * (1 + 1e-6)).all()
    np.testing.assert_allclose(out[0, :, 2], origin[0], rtol=1e-6)  # output 0 is persistence


def test_unobserved_targets_stay_unobserved_and_do_not_count_in_the_scale() -> None:
    y = np.array([[[10.0, np.nan]]])
    d = log_change(y, np.array([[10.0]]))
    assert d[0, 0, 0] == 0.0 and np.isnan(d[0, 0, 1])
    assert fit_log_scale(y, np.array([[10.0]])) == 1.0  # no spread: a neutral scale


def test_the_origin_is_read_from_the_scaled_window_and_never_negative() -> None:
    x = np.zeros((2, 4, 3, 2), dtype=np.float32)
    x[:, -1, :, 1] = [[1.0, -9.0, np.nan], [0.5, 0.0, 2.0]]
    np.testing.assert_allclose(origin_values(x, 1, 50.0, 20.0), [[70.0, 0.0, 50.0], [60.0, 50.0, 90.0]])


def test_only_known_spaces_are_accepted() -> None:
    assert check_transform("") == "none" and check_transform(" LOG1P ") == "log1p"
    with pytest.raises(ValueError, match="target_transform must be one of none, log1p, got 'log'"):
        check_transform("log")
