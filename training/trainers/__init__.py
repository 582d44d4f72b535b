"""Trainers, one per model type, created through :func:`get_trainer` (imports are lazy, so
importing this package does not import xgboost or torch)."""

from __future__ import annotations

import importlib

from aqimodels.client.errors import InvalidArgumentError
from aqimodels.training.core import Trainer

TRAINERS: dict[str, str] = {
    "xgboost": "aqimodels.training.trainers.xgboost:XGBoostTrainer",
    "lstm": "aqimodels.training.trainers.lstm:LSTMTrainer",
    "gnn": "aqimodels.training.trainers.gnn:GNNTrainer",
}
"""model type -> "module:class". The ensemble has no Trainer: the runner combines members."""


def get_trainer(model_type: str) -> Trainer:
    """A new trainer of ``model_type`` (xgboost, lstm, gnn)."""
    target = TRAINERS.get(model_type)
    if target is None:
        known = ", ".join(TRAINERS)
        hint = " (the ensemble is built by the runner from trained members)" if model_type == "ensemble" else ""
        raise InvalidArgumentError(f"unknown model type {model_type!r}; trainable: {known}{hint}", field="model_type")
    module, _, cls = target.partition(":")
    trainer: Trainer = getattr(importlib.import_module(module), cls)()
    return trainer
