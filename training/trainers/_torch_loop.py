"""The one training loop of the PyTorch trainers (LSTM and GNN), and their shared parts.

Both networks map a batch of scaled windows ``[B, window, S, F]`` to scaled PM2.5
``[B, S, H]`` (``(y - target_mean) / target_std``). Everything else lives here once:
mini-batching, the masked MSE loss, Adam with gradient clipping, early stopping on the
validation loss with the best weights restored, one :class:`EpochFinished` per epoch, the
stop checks, the convergence summary and the picklable :class:`TorchForecaster`.

``TrainConfig.extra`` keys read here (all strings, all optional):

* ``max_train_samples``: at most this many training windows per epoch, drawn afresh every
  epoch without replacement (default 4096, ``0`` = all). Hourly origins overlap heavily, so
  a fresh random subset per epoch keeps an epoch's cost bounded on the full Beijing data
  (about 24,500 origins) while every origin is still seen over the run; the default
  synthetic data (about 1,500 origins) is never subsampled.
* ``max_val_samples``: evaluate early stopping on at most this many validation windows,
  evenly spaced in time and fixed for the whole run (default 2048, ``0`` = all).
* ``target_transform``: ``none`` (default: the network predicts the standardised target) or
  ``log1p`` (it predicts the log change from the origin hour; see
  :mod:`aqimodels.training.runtime.target_space`).
* ``grad_clip`` (default 1.0, total L2 norm), ``weight_decay`` (default 0),
  ``dropout`` (default 0.1), ``station_embedding_dim`` (default 4),
  ``num_threads`` (default 1, never above 2), ``stop_check_every`` (batches, default 8).

Threads: the networks are small (hidden 64, a few hundred sequences per batch), so a second
intra-op thread gains little on an idle machine, while on a busy 2-core worker (the registry,
MLflow and tests share it) two OpenMP threads were measured 3-5x *slower* than one. Hence one
thread by default; ``num_threads=2`` is allowed for a dedicated machine.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch
from aqimodels.training.core import EpochFinished, FeatureSet, TrainConfig, TrainingCancelled
from aqimodels.training.runtime.nets import (  # noqa: F401 - old pickles name these classes here
    DEFAULT_THREADS,
    MAX_THREADS,
    ForecastHead,
    StationEncoder,
    TorchForecaster,
    _as_input,
    torch_threads,
)
from aqimodels.training.runtime.nets import predict_scaled as _predict_scaled
from aqimodels.training.runtime.target_space import (
    DEFAULT_TARGET_TRANSFORM,
    check_transform,
    fit_log_scale,
    log_change,
    origin_values,
)
from torch import nn

# ---- settings ----


def extra_int(config: TrainConfig, key: str, default: int) -> int:
    """An integer from ``config.extra``, or ``default`` when absent or empty."""
    raw = config.extra.get(key, "")
    return int(raw) if raw.strip() else default


def extra_float(config: TrainConfig, key: str, default: float) -> float:
    """A float from ``config.extra``, or ``default`` when absent or empty."""
    raw = config.extra.get(key, "")
    return float(raw) if raw.strip() else default


@dataclass(frozen=True)
class LoopSettings:
    """Resolved optimisation settings of one run (``TrainConfig`` with defaults filled in)."""

    max_epochs: int = 30
    learning_rate: float = 2e-3
    batch_size: int = 64
    patience: int = 5
    seed: int = 42
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    max_train_samples: int = 4096
    max_val_samples: int = 2048
    num_threads: int = DEFAULT_THREADS
    stop_check_every: int = 8
    target_transform: str = DEFAULT_TARGET_TRANSFORM

    @classmethod
    def from_config(cls, config: TrainConfig) -> LoopSettings:
        """Fills ``None`` fields of ``config`` with the defaults above and reads the ``extra`` keys."""
        d = cls()
        settings = cls(
            max_epochs=config.max_epochs if config.max_epochs is not None else d.max_epochs,
            learning_rate=config.learning_rate if config.learning_rate is not None else d.learning_rate,
            batch_size=config.batch_size if config.batch_size is not None else d.batch_size,
            patience=(
                config.early_stopping_patience if config.early_stopping_patience is not None else d.patience
            ),
            seed=config.seed,
            grad_clip=extra_float(config, "grad_clip", d.grad_clip),
            weight_decay=extra_float(config, "weight_decay", d.weight_decay),
            max_train_samples=extra_int(config, "max_train_samples", d.max_train_samples),
            max_val_samples=extra_int(config, "max_val_samples", d.max_val_samples),
            num_threads=min(MAX_THREADS, extra_int(config, "num_threads", d.num_threads)),
            stop_check_every=extra_int(config, "stop_check_every", d.stop_check_every),
            target_transform=check_transform(config.extra.get("target_transform", "")),
        )
        if settings.max_epochs < 1 or settings.batch_size < 1 or settings.learning_rate <= 0:
            raise ValueError(f"invalid training settings: {settings}")
        return settings


def seed_everything(seed: int) -> None:
    """Seeds torch's global RNG (weight init, dropout) before a network is built."""
    torch.manual_seed(seed)


# ---- loss and prediction ----


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the cells where ``mask`` is true (targets there are finite)."""
    diff = torch.where(mask, pred - target, torch.zeros_like(pred))
    return (diff * diff).sum() / mask.sum().clamp(min=1)


def masked_rmse(pred: np.ndarray, y: np.ndarray) -> float:
    """RMSE over the finite cells of ``y`` (NaN if there are none)."""
    mask = ~np.isnan(y)
    if not mask.any():
        return float("nan")
    return float(np.sqrt(np.mean((pred[mask] - y[mask]) ** 2)))


# ---- the loop ----


@dataclass
class LoopResult:
    forecaster: TorchForecaster
    convergence: dict[str, float]


def _check(stop: threading.Event) -> None:
    if stop.is_set():
        raise TrainingCancelled("training cancelled")


def _evenly_spaced(x: np.ndarray, y: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``cap`` samples of ``(x, y)``, evenly spaced in time (no copy when under the cap)."""
    n = x.shape[0]
    if cap <= 0 or n <= cap:
        return x, y
    idx = np.unique(np.linspace(0, n - 1, cap).round().astype(np.int64))
    return x[idx], y[idx]


def train_loop(
    module: nn.Module,
    features: FeatureSet,
    settings: LoopSettings,
    stop: threading.Event,
) -> Generator[EpochFinished, None, LoopResult]:
    """Trains ``module`` on ``features.train``, early-stopping on ``features.val``.

    Yields one :class:`EpochFinished` per epoch (``elapsed_seconds`` counts from the start of
    training). Checks ``stop`` before every epoch and every ``stop_check_every`` batches and
    raises :class:`TrainingCancelled` when it is set. Returns (``yield from``) the forecaster
    holding the best-validation weights and the convergence summary.

    The early-stopping criterion is the masked validation MSE in scaled units; without
    validation data it falls back to the training loss. Training stops after ``patience``
    epochs without improvement (``patience <= 0`` disables early stopping).
    """
    with torch_threads(settings.num_threads):
        return (yield from _train(module, features, settings, stop))


def _train(
    module: nn.Module, features: FeatureSet, settings: LoopSettings, stop: threading.Event
) -> Generator[EpochFinished, None, LoopResult]:
    started = time.monotonic()
    mean, std = float(features.target_mean), float(features.target_std)
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"target_std must be positive, got {std}")

    log = settings.target_transform == "log1p"
    if log and features.target not in features.feature_names:
        raise ValueError(f"target_transform log1p needs the target {features.target} among the inputs")
    head = getattr(module, "head", None)
    if isinstance(head, ForecastHead) and features.target in features.feature_names:
        head.start_at_persistence(features.target_index, change=log)

    train_x = features.train.x
    index = features.target_index if features.target in features.feature_names else 0
    if log:
        origin = origin_values(train_x, index, mean, std)
        log_scale = fit_log_scale(features.train.y, origin)
        train_y = torch.as_tensor((log_change(features.train.y, origin) / log_scale).astype(np.float32))
    else:
        log_scale = 1.0
        train_y = torch.as_tensor((np.asarray(features.train.y, dtype=np.float32) - mean) / std)
    forecaster = TorchForecaster(module, mean, std, num_threads=settings.num_threads,
                                 target_transform=settings.target_transform, target_index=index,
                                 log_scale=log_scale, target=features.target)
    train_mask = ~torch.isnan(train_y)
    train_y = torch.nan_to_num(train_y)
    n_train = train_x.shape[0]
    if n_train == 0:
        raise ValueError("no training samples")

    val_x, val_y = _evenly_spaced(features.val.x, features.val.y, settings.max_val_samples)
    has_val = val_x.shape[0] > 0 and bool((~np.isnan(val_y)).any())

    gen = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.Adam(
        module.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    per_epoch = n_train if settings.max_train_samples <= 0 else min(n_train, settings.max_train_samples)

    best_score = math.inf
    best_state = copy.deepcopy(module.state_dict())
    best_epoch = 0
    epochs_run = 0
    final_loss = math.nan
    early_stopped = False

    for epoch in range(1, settings.max_epochs + 1):
        _check(stop)
        module.train()
        order = torch.randperm(n_train, generator=gen)[:per_epoch].numpy()
        sum_sq, cells = 0.0, 0
        for i, start in enumerate(range(0, per_epoch, settings.batch_size)):
            if i % max(1, settings.stop_check_every) == 0:
                _check(stop)
            idx = np.sort(order[start : start + settings.batch_size])
            mask = train_mask[idx]
            n_cells = int(mask.sum())
            if n_cells == 0:
                continue
            loss = masked_mse(module(_as_input(train_x[idx])), train_y[idx], mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch's backward() is unannotated
            if settings.grad_clip > 0:
                nn.utils.clip_grad_norm_(module.parameters(), settings.grad_clip)
            optimizer.step()
            sum_sq += float(loss.detach()) * n_cells
            cells += n_cells
        final_loss = sum_sq / max(cells, 1)
        epochs_run = epoch

        if has_val:
            pred = np.clip(forecaster.to_target(_predict_scaled(module, val_x, 512), val_x), 0.0, None)  # as forecast
            val_rmse = masked_rmse(pred, val_y)
            score = (val_rmse / std) ** 2
        else:
            val_rmse, score = math.nan, final_loss
        if score < best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(module.state_dict())
        yield EpochFinished(
            epoch=epoch,
            total_epochs=settings.max_epochs,
            loss=float(final_loss),
            validation_rmse=float(val_rmse),
            elapsed_seconds=time.monotonic() - started,
        )
        if 0 < settings.patience <= epoch - best_epoch and epoch < settings.max_epochs:
            early_stopped = True
            break

    _check(stop)
    module.load_state_dict(best_state)
    module.eval()
    convergence: dict[str, float] = {
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "final_loss": float(final_loss),
        "early_stopped": 1 if early_stopped else 0,
        "best_validation_rmse": float(math.sqrt(best_score) * std) if has_val else math.nan,
    }
    return LoopResult(forecaster, convergence)
