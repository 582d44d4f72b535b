"""The PyTorch networks and forecaster at inference (LSTM; the GNN in ``gnn_net``).

Both networks map scaled windows ``[B, window, S, F]`` to the scaled target ``[B, S, H]``
(``(y - target_mean) / target_std``), or with ``target_transform="log1p"`` the scaled log change
from the origin hour (:mod:`.target_space`). :class:`TorchForecaster` turns that into µg/m³,
bounded below by 0 (a concentration cannot be negative; the bound can only lower each cell's
error, since every observed target is >= 0). Training is in ``aqimodels.training.trainers``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .target_space import DEFAULT_TARGET_TRANSFORM, from_log_change, origin_values

MAX_THREADS = 2
"""The worker machines have 2 cores; torch never gets more threads than this."""
DEFAULT_THREADS = 1
DEFAULT_HIDDEN_SIZE = 64


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Runs the block with torch on ``n`` intra-op threads (1..2), restoring the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, MAX_THREADS)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class StationEncoder(nn.Module):
    """Per-station temporal encoder with weights shared across stations.

    Each station's window ``x[:, :, s, :]`` plus a small learned station embedding goes through
    one LSTM; the output is the last hidden state of every (sample, station) pair, ordered
    sample-major (row ``b * S + s``), which is also the node order of the GNN's batched graph.
    """

    def __init__(self, n_features: int, n_stations: int, hidden_size: int, embedding_dim: int = 4) -> None:
        super().__init__()
        self.n_stations = n_stations
        self.embedding = nn.Embedding(n_stations, embedding_dim)
        self.lstm = nn.LSTM(n_features + embedding_dim, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, w, s, f = x.shape
        seq = x.permute(0, 2, 1, 3).reshape(b * s, w, f)
        emb = self.embedding.weight[None, :, None, :].expand(b, s, w, -1).reshape(b * s, w, -1)
        _, (h_n, _) = self.lstm(torch.cat([seq, emb], dim=-1))
        last_hidden: torch.Tensor = h_n[-1]
        return last_hidden


class ForecastHead(nn.Module):
    """Hidden state plus the station's last input step -> H scaled horizons.

    The skip from the last input step lets the head learn persistence directly, so the
    recurrent part only has to learn the correction.
    """

    def __init__(self, hidden_size: int, n_features: int, horizon: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self._n_features = n_features
        self.linear = nn.Linear(hidden_size + n_features, horizon)

    def start_at_persistence(self, target_index: int, change: bool = False) -> None:
        """Initialises the head to forecast "the target stays as it is now" at every horizon.

        Inputs and targets share the target's scaler, so persistence is weight 1 on the last
        input's target and 0 elsewhere; training then learns corrections instead of rediscovering
        the level (measured: without this the LSTM's +1 h rmse was more than twice persistence's).
        A head that predicts the change from the origin (``change``) starts near 0 instead.
        """
        hidden = self.linear.in_features - self._n_features
        with torch.no_grad():
            self.linear.weight.mul_(0.1)
            self.linear.weight[:, hidden + target_index] = 0.0 if change else 1.0
            self.linear.bias.zero_()

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, _, s, f = x.shape
        last = x[:, -1].reshape(b * s, f)
        out: torch.Tensor = self.linear(torch.cat([self.dropout(h), last], dim=-1))
        return out.view(b, s, -1)


class LSTMNet(nn.Module):
    """``[B, window, S, F]`` scaled windows -> ``[B, S, H]`` scaled target, station by station."""

    def __init__(self, n_features: int, n_stations: int, horizon: int, hidden_size: int = DEFAULT_HIDDEN_SIZE,
                 embedding_dim: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.init_args = {"n_features": n_features, "n_stations": n_stations, "horizon": horizon,
                          "hidden_size": hidden_size, "embedding_dim": embedding_dim, "dropout": dropout}
        self.encoder = StationEncoder(n_features, n_stations, hidden_size, embedding_dim)
        self.head = ForecastHead(hidden_size, n_features, horizon, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder(x), x)
        return out


def _as_input(x: np.ndarray) -> torch.Tensor:
    # Unobserved scaled inputs become 0, the training mean, rather than poisoning the batch.
    return torch.nan_to_num(torch.as_tensor(np.asarray(x, dtype=np.float32)))


def predict_scaled(module: nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    was_training = module.training
    module.eval()
    outs: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                outs.append(module(_as_input(x[start : start + batch_size])).numpy())
    finally:
        module.train(was_training)
    if not outs:
        return np.zeros((0, x.shape[2], 0), dtype=np.float32)
    return np.concatenate(outs, axis=0)


def _net_kind(module: nn.Module) -> str:
    return "gnn" if hasattr(module, "convs") else "lstm"


def _init_args(module: Any) -> dict[str, Any]:
    """Constructor arguments of a network (read from its layers for networks pickled before they
    recorded them)."""
    recorded = module.__dict__.get("init_args")
    if recorded is not None:
        return {k: v for k, v in recorded.items() if k not in ("edge_index", "edge_weight")}
    head, enc = module.head, module.encoder
    args = {"n_features": head._n_features, "n_stations": enc.n_stations, "horizon": head.linear.out_features,
            "hidden_size": enc.lstm.hidden_size, "embedding_dim": enc.embedding.embedding_dim,
            "dropout": head.dropout.p}
    if _net_kind(module) == "gnn":
        args.update(n_layers=len(module.convs), conv=getattr(module, "conv_kind", "gcn"))
    return args


class TorchForecaster:
    """A fitted PyTorch network plus the target scaling; forecasts in µg/m³, bounded below by 0.

    ``predict`` runs in eval mode on CPU without gradients, in batches, on ``num_threads``
    threads (default 1, restored afterwards): on a busy 2-core machine a 2-thread predict of a
    few hundred windows was measured 10-25x slower.
    """

    def __init__(self, module: nn.Module, target_mean: float, target_std: float, batch_size: int = 512,
                 num_threads: int = DEFAULT_THREADS, target_transform: str = DEFAULT_TARGET_TRANSFORM,
                 target_index: int = 0, log_scale: float = 1.0, target: str = "pm25") -> None:
        self.module = module.cpu().eval()
        self.target_mean = float(target_mean)
        self.target_std = float(target_std)
        self.batch_size = int(batch_size)
        self.num_threads = int(num_threads)
        self.target_transform = target_transform
        self.target_index = int(target_index)
        self.log_scale = float(log_scale)
        self.target = target

    @property
    def transform(self) -> str:  # networks pickled before the option have no attribute
        return str(self.__dict__.get("target_transform", DEFAULT_TARGET_TRANSFORM))

    def to_target(self, scaled: np.ndarray, x: np.ndarray) -> np.ndarray:
        """µg/m³ (before the lower bound) from the network's output ``scaled`` for windows ``x``."""
        if self.transform == "log1p":
            origin = origin_values(x, self.target_index, self.target_mean, self.target_std)
            return from_log_change(scaled, origin, self.log_scale, self.target)
        return (scaled * self.target_std + self.target_mean).astype(np.float32)

    def predict_unbounded(self, x: np.ndarray) -> np.ndarray:
        """The network's forecast before the lower bound (for measuring what the bound changes)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ValueError(f"expected x of shape [N, window, S, F], got {x.shape}")
        with torch_threads(self.num_threads):
            scaled = predict_scaled(self.module, x, self.batch_size)
        return self.to_target(scaled, x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Forecast from scaled windows ``x`` ``[N, window, S, F]`` to µg/m³ ``[N, S, H]``, >= 0."""
        forecast: np.ndarray = np.clip(self.predict_unbounded(x), 0.0, None)
        return forecast

    # ---- portable state: constructor arguments (JSON) plus the state dict (weights only) ----
    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        args = _init_args(self.module)
        torch.save(self.module.state_dict(), os.path.join(folder, "weights.pt"))
        with open(os.path.join(folder, "forecaster.json"), "w") as f:
            json.dump({"kind": "torch", "net": _net_kind(self.module), "init_args": args,
                       "target_mean": self.target_mean, "target_std": self.target_std,
                       "batch_size": self.batch_size, "num_threads": self.num_threads,
                       "target_transform": self.transform, "target_index": int(self.__dict__.get("target_index", 0)),
                       "log_scale": float(self.__dict__.get("log_scale", 1.0)),
                       "target": str(self.__dict__.get("target", "pm25"))}, f)

    @classmethod
    def load(cls, folder: str, header: dict[str, Any]) -> TorchForecaster:
        state = torch.load(os.path.join(folder, "weights.pt"), weights_only=True)
        args = dict(header["init_args"])
        if header["net"] == "gnn":
            from .gnn_net import GNNNet

            module: nn.Module = GNNNet(edge_index=state["edge_index"].numpy(), edge_weight=state["edge_weight"].numpy(),
                                       **args)
        else:
            module = LSTMNet(**args)
        module.load_state_dict(state)
        return cls(module, header["target_mean"], header["target_std"], header.get("batch_size", 512),
                   header.get("num_threads", DEFAULT_THREADS), header.get("target_transform", DEFAULT_TARGET_TRANSFORM),
                   header.get("target_index", 0), header.get("log_scale", 1.0), header.get("target", "pm25"))
