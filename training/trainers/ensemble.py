"""Ensemble weights: the convex combination of member forecasts with the least masked MSE.

``fit_weights`` solves

    minimise  mean over observed cells of (sum_m w_m * pred_m - y)^2
    subject to  w_m >= 0,  sum_m w_m = 1

exactly. The objective is a convex quadratic in ``w``; its minimiser over the simplex is the
solution of the equality-constrained problem (a small KKT linear system) on some face of the
simplex, so the solver enumerates every face (support set), keeps the feasible solutions and
returns the best. Ensembles have a handful of members (``2**M - 1`` faces: 7 for the usual
three), so this is exact and instant; above :data:`MAX_EXACT_MEMBERS` members it falls back to
``scipy.optimize.nnls`` on the stacked predictions, normalised to sum 1.

Guarantee: every single member is a vertex of the simplex (a one-member face), which is among
the candidates, so with weights fit on validation data the ensemble's validation MSE is never
worse than the best member's. (On the test split it usually is better too, but nothing
guarantees that.) Degenerate inputs (no observed cell, non-finite predictions everywhere, a
single member) give equal weights.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import optimize

MAX_EXACT_MEMBERS = 12


def _masked_design(member_preds: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``A`` ``[K, M]`` (one column per member) and ``b`` ``[K]`` over the usable cells."""
    preds = np.asarray(member_preds, dtype=np.float64)
    target = np.asarray(y, dtype=np.float64)
    if preds.ndim < 2 or preds.shape[1:] != target.shape:
        raise ValueError(f"member_preds {preds.shape} must be [M, *y.shape] with y {target.shape}")
    mask = np.isfinite(target) & np.all(np.isfinite(preds), axis=0)
    return preds[:, mask].T, target[mask]


def _simplex_lstsq(gram: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """argmin ``w' G w - 2 c' w`` over the simplex, by enumerating supports (KKT on each face)."""
    m = gram.shape[0]
    # A relative ridge makes every face's system non-singular (identical members) without
    # moving the optimum measurably.
    gram = gram + np.eye(m) * 1e-12 * max(float(np.trace(gram)) / m, 1e-300)
    best_w: np.ndarray | None = None
    best_obj = np.inf
    for size in range(1, m + 1):
        for support in itertools.combinations(range(m), size):
            idx = list(support)
            kkt = np.zeros((size + 1, size + 1))
            kkt[:size, :size] = 2 * gram[np.ix_(idx, idx)]
            kkt[:size, size] = 1.0
            kkt[size, :size] = 1.0
            rhs = np.concatenate([2 * cross[idx], [1.0]])
            sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if np.any(sol < -1e-10):
                continue
            w = np.zeros(m)
            w[idx] = np.clip(sol, 0.0, None)
            w /= w.sum()
            obj = float(w @ gram @ w - 2 * cross @ w)
            # Faces are tried smallest first; a larger one must improve by more than rounding
            # noise, so an optimum on an edge comes out with its zero weights exactly zero
            # (otherwise the BLAS of the day decides whether a 1e-12 weight survives).
            if best_w is None or obj < best_obj - 1e-12 * max(1.0, abs(best_obj)):
                best_w, best_obj = w, obj
    return best_w if best_w is not None else np.full(m, 1.0 / m)


def fit_weights(member_preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative member weights summing to 1 that minimise the masked MSE against ``y``.

    Args:
        member_preds: ``[M, N, S, H]`` member forecasts (µg/m³); a cell where any member is
            non-finite is left out.
        y: ``[N, S, H]`` observed PM2.5; NaN cells are left out.

    Returns:
        float64 ``[M]`` weights on the simplex. With weights fit on validation data the combined
        validation MSE is at most the best member's (see the module docstring).
    """
    a, b = _masked_design(member_preds, y)
    m = a.shape[1]
    equal = np.full(m, 1.0 / m)
    if m <= 1 or b.size == 0:
        return equal
    # Scale to O(1) so the ridge and tolerances mean the same at any PM2.5 level.
    scale = max(float(np.sqrt(np.mean(b**2))), float(np.sqrt(np.mean(a**2))), 1e-12)
    a, b = a / scale, b / scale
    if m <= MAX_EXACT_MEMBERS:
        weights = _simplex_lstsq(a.T @ a / b.size, a.T @ b / b.size)
    else:
        raw, _ = optimize.nnls(a, b)
        weights = raw / raw.sum() if raw.sum() > 0 else equal
        # Normalising NNLS is not the simplex optimum: keep the guarantee by checking the vertices.
        member_mse = _column_mse(a, b)
        best_member = int(np.argmin(member_mse))
        if member_mse[best_member] < float(np.mean((a @ weights - b) ** 2)):
            weights = np.eye(m)[best_member]
    if not np.all(np.isfinite(weights)):
        return equal
    return weights


HOLDOUT_MIN_ORIGINS = 24
"""Validation origins each half needs before combining is judged out of sample (below: in sample)."""


def fit_horizon_weights(member_preds: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One simplex of weights per horizon, ``[M, H]``, kept only where combining pays out of sample.

    Members are good at different lead times (on Beijing XGBoost is best at +1 h, the LSTM at
    +24 h), so each horizon gets its own weights. Per horizon, weights fit on the first half of
    the validation origins (``member_preds``/``y`` are in time order) are judged on the second
    half against the member that was best on the first half. Where the combination wins there,
    the weights refit on all validation data are used; where it does not, the member best on
    all validation data gets weight 1.

    Why: fit and judged on the same data, the combination always looks at least as good (see
    :func:`fit_weights`), but that says nothing of new data. On Beijing it gained 0.2-0.3% on
    validation at +1, +6 and +24 h, yet lost 0.6% to XGBoost on the test set at +1 h; fit on
    one half of validation, it lost on the other half at all three (1.1%, 2.6%, 0.3%;
    bench/NOTES.md). Members that err alike cannot be combined for a gain, and this rule says so
    instead of fitting noise.
    """
    preds = np.asarray(member_preds)
    target = np.asarray(y)
    n = preds.shape[1]
    half = n // 2
    out = []
    for h in range(preds.shape[-1]):
        p_h, y_h = preds[..., h:h + 1], target[..., h:h + 1]
        if preds.shape[0] > 1 and half >= HOLDOUT_MIN_ORIGINS and not _pays_out_of_sample(p_h, y_h, half):
            out.append(np.eye(preds.shape[0])[_best_member(p_h, y_h)])
        else:
            out.append(fit_weights(p_h, y_h))
    return np.stack(out, axis=1)


def _column_mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each member's (column's) mean squared error against ``b``."""
    mse: np.ndarray = np.mean((a - b[:, None]) ** 2, axis=0)
    return mse


def _best_member(member_preds: np.ndarray, y: np.ndarray) -> int:
    a, b = _masked_design(member_preds, y)
    return int(np.argmin(_column_mse(a, b))) if b.size else 0


def _pays_out_of_sample(member_preds: np.ndarray, y: np.ndarray, half: int) -> bool:
    """Weights fit on the first ``half`` origins beat the first half's best member on the rest."""
    first_p, first_y = member_preds[:, :half], y[:half]
    rest_p, rest_y = member_preds[:, half:], y[half:]
    weights = fit_weights(first_p, first_y)
    a, b = _masked_design(rest_p, rest_y)
    if b.size == 0:
        return True
    combined = float(np.mean((a @ weights - b) ** 2))
    single = float(_column_mse(a, b)[_best_member(first_p, first_y)])
    return combined < single


def combine(member_preds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted forecast ``[M, N, S, H]`` -> ``[N, S, H]``, with weights ``[M]`` (one set for all
    horizons) or ``[M, H]`` (one set per horizon)."""
    preds = np.asarray(member_preds)
    w = np.asarray(weights, dtype=np.float64)
    out_type = preds.dtype if preds.dtype.kind == "f" else np.float64
    if w.shape == (preds.shape[0],):
        return np.tensordot(w, preds, axes=1).astype(out_type)
    if w.shape == (preds.shape[0], preds.shape[-1]):
        per_horizon: np.ndarray = np.einsum("mh,mnsh->nsh", w, preds)
        return per_horizon.astype(out_type)
    raise ValueError(f"weights {w.shape} do not match {preds.shape[0]} members and {preds.shape[-1]} horizons")
