"""LSTM forecaster: one sequence model shared by all stations, blind to the other stations.

Each station's window ``x[:, :, s, :]`` plus a learned station embedding goes through one LSTM;
a linear head maps the last hidden state (and the last input step) to the 24 scaled horizons.
The GNN (:mod:`aqimodels.training.trainers.gnn`) uses the very same encoder and head and only
adds graph layers in between, so comparing the two measures what the station graph is worth.

Training (batching, masked loss, early stopping, events, cancellation) is the shared loop in
:mod:`aqimodels.training.trainers._torch_loop`; its docstring lists the ``extra`` keys.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from aqimodels.training.core import EpochFinished, FeatureSet, Forecaster, TrainConfig
from aqimodels.training.runtime.nets import DEFAULT_HIDDEN_SIZE, LSTMNet
from aqimodels.training.trainers._torch_loop import (
    LoopSettings,
    extra_float,
    extra_int,
    seed_everything,
    train_loop,
)


class LSTMTrainer:
    """Trains :class:`LSTMNet`; implements :class:`aqimodels.training.core.Trainer`.

    Defaults: 30 epochs, Adam lr 2e-3, batch 64, patience 5, hidden 64, station embedding 4,
    dropout 0.1, gradient clip 1.0, at most 4096 training windows per epoch.
    """

    name = "lstm"

    def __init__(self) -> None:
        self.forecaster: Forecaster | None = None
        self.convergence: dict[str, float] = {}

    def fit(
        self, features: FeatureSet, config: TrainConfig, stop: threading.Event
    ) -> Iterator[EpochFinished]:
        """Yields one ``EpochFinished`` per epoch; fills ``forecaster`` and ``convergence`` at the end."""
        settings = LoopSettings.from_config(config)
        seed_everything(settings.seed)
        module = LSTMNet(
            n_features=features.train.x.shape[3],
            n_stations=features.train.x.shape[2],
            horizon=features.horizon,
            hidden_size=config.hidden_size or DEFAULT_HIDDEN_SIZE,
            embedding_dim=extra_int(config, "station_embedding_dim", 4),
            dropout=extra_float(config, "dropout", 0.1),
        )
        result = yield from train_loop(module, features, settings, stop)
        self.forecaster = result.forecaster
        self.convergence = result.convergence
