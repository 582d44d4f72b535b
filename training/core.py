"""Shared types of the training package: the job, its progress events, the feature arrays.

Every trainer consumes one :class:`FeatureSet` (built by ``aqimodels.training.features``) and
produces a :class:`Forecaster`; the runner (``aqimodels.training.runner``) turns a
:class:`TrainJob` into a stream of :class:`ProgressEvent` values, ending with ``Finished``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from aqimodels.client.domain import registered_model_name

HORIZON_HOURS = 24
"""Every model forecasts PM2.5 at hours +1..+24."""


REPORT_HORIZONS: tuple[int, ...] = (1, 6, 24)
"""Horizons (hours ahead) with their own metrics: ``rmse_h1``, ``rmse_h6``, ``rmse_h24`` ..."""


@dataclass(frozen=True)
class TrainConfig:
    """Training parameters; ``None`` means the trainer's own default."""

    max_epochs: int | None = None
    window_hours: int = 24
    learning_rate: float | None = None
    batch_size: int | None = None
    early_stopping_patience: int | None = None
    seed: int = 42
    hidden_size: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EnsembleMemberRef:
    """An existing registered version that the ensemble combines."""

    model_type: str
    model_name: str
    version: int
    model_uri: str


@dataclass(frozen=True)
class TrainJob:
    """One training, as the worker receives it."""

    job_id: str
    model_type: str
    dataset: str = "synthetic"
    config: TrainConfig = field(default_factory=TrainConfig)
    experiment_name: str = "aqi-predictor"
    registered_model_name: str = ""
    ensemble_members: tuple[EnsembleMemberRef, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    start_time: np.datetime64 | None = None
    end_time: np.datetime64 | None = None
    target: str = "pm25"
    champion_model_uri: str = ""
    """The production version to score on this training's test rows (like-for-like promotion)."""

    @property
    def model_name(self) -> str:
        return self.registered_model_name or registered_model_name(self.model_type, self.target)


# ---- progress events (STYLE.md section 7) ----


@dataclass(frozen=True)
class Started:
    run_id: str
    experiment_id: str
    total_steps: int


@dataclass(frozen=True)
class DataLoaded:
    stations: int
    hours: int
    train_samples: int
    validation_samples: int
    test_samples: int
    fingerprint: str


@dataclass(frozen=True)
class EpochFinished:
    epoch: int  # 1-based
    total_epochs: int
    loss: float  # training loss, scaled units
    validation_rmse: float  # PM2.5 µg/m³
    member: str = ""  # for the ensemble's member events
    elapsed_seconds: float = 0.0


@dataclass(frozen=True)
class Evaluating:
    test_samples: int


@dataclass(frozen=True)
class Registering:
    model_name: str


@dataclass(frozen=True)
class Finished:
    model_name: str
    version: int
    run_id: str
    model_uri: str
    metrics: dict[str, float]
    training_seconds: float


ProgressEvent = Started | DataLoaded | EpochFinished | Evaluating | Registering | Finished


class TrainingCancelled(Exception):
    """Raised inside a training when its stop event is set; the run ends KILLED."""


# ---- feature arrays (one pipeline for all model types) ----


@dataclass
class Split:
    """One chronological split of forecast origins.

    Attributes:
        x: float32 ``[N, window, S, F]``, scaled input windows ending at each origin hour.
        y: float32 ``[N, S, H]``, PM2.5 in µg/m³ at origin+1..origin+H (NaN where unobserved).
        last_pm25: float32 ``[N, S]``, the last observed PM2.5 at the origin (persistence baseline).
        times: datetime64 ``[N]``, the origin hours.
    """

    x: np.ndarray
    y: np.ndarray
    last_pm25: np.ndarray
    times: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """True where the target was observed; losses and metrics use only these cells."""
        observed: np.ndarray = ~np.isnan(self.y)
        return observed

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class FeatureSet:
    """Features of one dataset, split train/validation/test (the last 20% is test).

    Attributes:
        stations: station names, the S axis.
        coords: float64 ``[S, 2]`` latitude and longitude in degrees.
        feature_names: the F axis; ``feature_names.index("pm25")`` is the scaled PM2.5 input.
        window: hours in each input window.
        horizon: hours forecast ahead.
        target_mean, target_std: the target's scaling fitted on training data (neural trainers
            predict ``(y - mean) / std``).
        target: the pollutant forecast (``pm25`` unless the dataset spec chose another).
    """

    stations: list[str]
    coords: np.ndarray
    feature_names: list[str]
    window: int
    horizon: int
    train: Split
    val: Split
    test: Split
    target_mean: float
    target_std: float
    target: str = "pm25"

    @property
    def target_index(self) -> int:
        return self.feature_names.index(self.target)


class Forecaster(Protocol):
    """A fitted model over scaled windows."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Forecast from ``x`` ``[N, window, S, F]`` to PM2.5 µg/m³ ``[N, S, H]``."""
        ...


class Trainer(Protocol):
    """Fits one model type, yielding one ``EpochFinished`` per epoch or boosting round.

    It must check ``stop`` at least once per epoch/round and raise ``TrainingCancelled`` when
    set. After the iterator is exhausted, ``forecaster`` holds the fitted model and
    ``convergence`` a small dict (epochs_run, best_epoch, final_loss, early_stopped).
    """

    name: str
    forecaster: Forecaster | None
    convergence: dict[str, float]

    def fit(self, features: FeatureSet, config: TrainConfig, stop: threading.Event) -> Iterator[EpochFinished]:
        ...
