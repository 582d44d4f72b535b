"""Ensemble weight fitting: simplex constraint, recovery, NaN targets, no worse than the best member."""

from __future__ import annotations

import numpy as np
import pytest
from aqimodels.training.trainers import ensemble
from aqimodels.training.trainers.ensemble import combine, fit_weights


def _masked_mse(pred: np.ndarray, y: np.ndarray) -> float:
    mask = ~np.isnan(y)
    return float(np.mean((pred[mask] - y[mask]) ** 2))


def _members(
    seed: int = 0, m: int = 3, shape: tuple[int, ...] = (200, 4, 24)
) -> tuple[np.ndarray, np.ndarray]:
    """A truth and M noisy, differently biased members of it."""
    rng = np.random.default_rng(seed)
    truth = 50 + 20 * rng.standard_normal(shape)
    preds = np.stack([truth + rng.normal(3 * (i - 1), 5 + 3 * i, shape) for i in range(m)])
    return preds, truth


def test_weights_are_on_the_simplex() -> None:
    preds, y = _members()
    w = fit_weights(preds, y)
    assert w.shape == (3,)
    assert np.all(w >= 0)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)


def test_recovers_known_convex_weights() -> None:
    rng = np.random.default_rng(1)
    preds = 40 + 15 * rng.standard_normal((3, 300, 5, 24))
    true_w = np.array([0.2, 0.5, 0.3])
    y = np.tensordot(true_w, preds, axes=1)
    np.testing.assert_allclose(fit_weights(preds, y), true_w, atol=1e-6)


def test_recovers_a_boundary_solution() -> None:
    """The optimum on an edge of the simplex (one weight exactly 0) is found, not just approximated."""
    rng = np.random.default_rng(2)
    preds = 40 + 15 * rng.standard_normal((3, 300, 5, 24))
    y = 0.7 * preds[0] + 0.3 * preds[2]
    w = fit_weights(preds, y)
    np.testing.assert_allclose(w, [0.7, 0.0, 0.3], atol=1e-6)
    assert w[1] == 0.0


def test_biased_members_still_get_weights_summing_to_one() -> None:
    """Unconstrained least squares would scale all members up; the simplex forbids that."""
    preds, y = _members(seed=3)
    w = fit_weights(0.5 * preds, y)
    assert w.sum() == pytest.approx(1.0)
    assert np.all(w >= 0)


def test_nan_targets_are_masked() -> None:
    rng = np.random.default_rng(4)
    preds = 40 + 15 * rng.standard_normal((2, 100, 3, 24))
    y = 0.25 * preds[0] + 0.75 * preds[1]
    hole = rng.random(y.shape) < 0.3
    # Garbage where the target is missing: it must not influence the fit.
    preds[0][hole] = 1e6
    y[hole] = np.nan
    w = fit_weights(preds, y)
    np.testing.assert_allclose(w, [0.25, 0.75], atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_combined_validation_mse_not_worse_than_best_member(seed: int) -> None:
    preds, y = _members(seed=seed, m=4)
    y[np.random.default_rng(seed).random(y.shape) < 0.05] = np.nan
    w = fit_weights(preds, y)
    best_member = min(_masked_mse(p, y) for p in preds)
    assert _masked_mse(combine(preds, w), y) <= best_member + 1e-9
    # And it is the simplex optimum: no random convex combination does better.
    rng = np.random.default_rng(100 + seed)
    fitted = _masked_mse(combine(preds, w), y)
    for cand in rng.dirichlet(np.ones(4), size=200):
        assert fitted <= _masked_mse(combine(preds, cand), y) + 1e-9


def test_dominant_member_gets_all_weight() -> None:
    """If one member is exact, mixing in others only hurts: the best vertex wins."""
    preds, y = _members(seed=6)
    preds[1] = y
    np.testing.assert_allclose(fit_weights(preds, y), [0.0, 1.0, 0.0], atol=1e-9)


def test_identical_members_are_handled() -> None:
    preds, y = _members(seed=7, m=1)
    stacked = np.concatenate([preds, preds, preds])
    w = fit_weights(stacked, y)
    assert w.sum() == pytest.approx(1.0) and np.all(w >= 0)
    np.testing.assert_allclose(combine(stacked, w), preds[0])


def test_degenerate_inputs_fall_back_to_equal_weights() -> None:
    preds, y = _members(seed=8)
    np.testing.assert_allclose(fit_weights(preds, np.full_like(y, np.nan)), [1 / 3] * 3)
    np.testing.assert_allclose(fit_weights(preds[:1], y), [1.0])


def test_many_members_use_the_nnls_fallback_and_keep_the_guarantee(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ensemble, "MAX_EXACT_MEMBERS", 2)
    preds, y = _members(seed=9, m=4)
    w = fit_weights(preds, y)
    assert w.sum() == pytest.approx(1.0) and np.all(w >= 0)
    assert _masked_mse(combine(preds, w), y) <= min(_masked_mse(p, y) for p in preds) + 1e-9


def test_combine_is_the_weighted_sum() -> None:
    preds = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)
    out = combine(preds, np.array([0.25, 0.75]))
    assert out.shape == (3, 2, 4)
    np.testing.assert_allclose(out, 0.25 * preds[0] + 0.75 * preds[1])
    with pytest.raises(ValueError):
        combine(preds, np.array([1.0]))


def test_shape_mismatch_is_rejected() -> None:
    preds, y = _members()
    with pytest.raises(ValueError):
        fit_weights(preds, y[:, :2])


def test_per_horizon_weights_follow_the_best_member_at_each_horizon() -> None:
    from aqimodels.training.trainers.ensemble import combine, fit_horizon_weights

    rng = np.random.default_rng(0)
    y = rng.normal(50, 10, size=(200, 3, 2))
    good_early = y + rng.normal(0, [1.0, 8.0], size=y.shape)  # good at horizon 1, poor at 2
    good_late = y + rng.normal(0, [8.0, 1.0], size=y.shape)
    preds = np.stack([good_early, good_late])
    w = fit_horizon_weights(preds, y)
    assert w.shape == (2, 2)
    np.testing.assert_allclose(w.sum(axis=0), 1.0)
    assert w[0, 0] > 0.8 and w[1, 1] > 0.8
    combined = combine(preds, w)
    for h in range(2):
        best = min(np.mean((p[..., h] - y[..., h]) ** 2) for p in preds)
        assert np.mean((combined[..., h] - y[..., h]) ** 2) <= best + 1e-9


def test_combining_is_kept_only_where_it_wins_out_of_sample() -> None:
    """Two members with independent errors combine; a member whose small gain on the first half
    of validation does not hold on the second half is dropped for the best single member."""
    from aqimodels.training.trainers.ensemble import fit_horizon_weights

    rng = np.random.default_rng(3)
    y = rng.normal(50, 10, size=(400, 3, 2))
    independent = np.stack([y + rng.normal(0, 2.0, y.shape), y + rng.normal(0, 2.0, y.shape)])
    w = fit_horizon_weights(independent, y)
    assert np.all(w.max(axis=0) < 0.8)  # a real gain: both members weigh at every horizon

    shared = rng.normal(0, 6.0, y.shape)  # the error both members make (weather they cannot know)
    steady = y + shared + rng.normal(0, 1.0, y.shape)
    drifting = y + shared + rng.normal(0, 1.3, y.shape)  # a little worse, then much worse on later origins
    drifting[200:] += rng.normal(0, 5.0, drifting[200:].shape)
    w = fit_horizon_weights(np.stack([steady, drifting]), y)
    np.testing.assert_array_equal(w, np.array([[1.0, 1.0], [0.0, 0.0]]))


def test_a_short_validation_set_is_combined_in_sample() -> None:
    from aqimodels.training.trainers.ensemble import HOLDOUT_MIN_ORIGINS, fit_horizon_weights

    preds, y = _members(shape=(2 * HOLDOUT_MIN_ORIGINS - 1, 4, 2))
    w = fit_horizon_weights(preds, y)
    np.testing.assert_allclose(w, np.stack([fit_weights(preds[..., h:h + 1], y[..., h:h + 1]) for h in range(2)],
                                           axis=1))
