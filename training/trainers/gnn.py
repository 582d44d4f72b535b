"""Graph forecaster: the LSTM's per-station encoder, then two attention layers over stations.

Stations are nodes. By default every station is joined to every other (Beijing has 12, all
within about 50 km); ``k_neighbors`` limits that to each station's ``k`` nearest by great-circle
(haversine) distance, made symmetric (an edge exists if either end is among the other's ``k``
nearest). Each edge carries its inverse-distance weight ``w = d_min / d`` in ``(0, 1]`` as an
edge feature. The network is

    per-station LSTM encoder (shared weights, station embedding)   -- identical to the LSTM's
    -> 2 x [h = h + dropout(relu(GATv2Conv(LayerNorm(h), edge_weight)))]   (4 heads, averaged)
    -> linear head on [h, last input step] -> 24 scaled horizons  -- identical to the LSTM's

so the only difference from :class:`aqimodels.training.trainers.lstm.LSTMNet` is that a node's
forecast can use other stations' states, with attention deciding how much each one counts from
the states themselves (which carry the wind). Fixed weights could not: with graph convolutions
(``GCNConv``) on the 3 nearest neighbours, inverse-distance weighted, the GNN was 2% worse than
the LSTM at +6 h on Beijing (50.14 against 48.97-49.58); with attention over all stations it is
better (47.80; bench/NOTES.md). ``extra["conv"] = "gcn"`` keeps the earlier layers, and models
pickled before the change still load and predict with them.

A batch of B samples is one disjoint graph of ``B * S`` nodes; the offset ``edge_index`` is
precomputed once per batch size.

``TrainConfig.extra`` keys: ``k_neighbors`` (default: all other stations), ``conv`` (``gat`` or
``gcn``) besides the shared ones of :mod:`aqimodels.training.trainers._torch_loop`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
from aqimodels.training.core import EpochFinished, FeatureSet, Forecaster, TrainConfig
from aqimodels.training.runtime.gnn_net import ATTENTION_HEADS, DEFAULT_CONV, GNNNet  # noqa: F401 - old pickles
from aqimodels.training.trainers._torch_loop import (
    LoopSettings,
    extra_float,
    extra_int,
    seed_everything,
    train_loop,
)

DEFAULT_HIDDEN_SIZE = 64
DEFAULT_K_NEIGHBORS = 3  # knn_graph's default; the trainer joins every station unless told
EARTH_RADIUS_KM = 6371.0088


def haversine_km(coords: np.ndarray) -> np.ndarray:
    """Pairwise great-circle distances ``[S, S]`` in km from ``[S, 2]`` latitude/longitude degrees."""
    lat, lon = np.radians(coords[:, 0])[:, None], np.radians(coords[:, 1])[:, None]
    a = np.sin((lat - lat.T) / 2) ** 2 + np.cos(lat) * np.cos(lat.T) * np.sin((lon - lon.T) / 2) ** 2
    return np.asarray(2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0))))


def knn_graph(coords: np.ndarray, k: int = DEFAULT_K_NEIGHBORS) -> tuple[np.ndarray, np.ndarray]:
    """The symmetric k-nearest-neighbour station graph.

    Args:
        coords: ``[S, 2]`` latitude and longitude in degrees.
        k: neighbours per station (capped at ``S - 1``).

    Returns:
        ``edge_index`` int64 ``[2, E]`` (both directions of every undirected edge, no self-loops,
        sorted) and ``edge_weight`` float32 ``[E]`` = ``d_min / d`` in ``(0, 1]``. Co-located
        stations (distance 0) get weight 1.
    """
    coords = np.asarray(coords, dtype=np.float64)
    s = coords.shape[0]
    k = min(int(k), s - 1)
    if k <= 0:
        return np.zeros((2, 0), dtype=np.int64), np.zeros(0, dtype=np.float32)
    dist = haversine_km(coords)
    np.fill_diagonal(dist, np.inf)
    adjacent = np.zeros((s, s), dtype=bool)
    nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]
    adjacent[np.repeat(np.arange(s), k), nearest.ravel()] = True
    adjacent |= adjacent.T
    src, dst = np.nonzero(adjacent)
    d = dist[src, dst]
    positive = d[d > 0]
    d_min = positive.min() if positive.size else 1.0
    weight = np.where(d > 0, d_min / np.maximum(d, 1e-12), 1.0)
    return np.stack([src, dst]).astype(np.int64), weight.astype(np.float32)


class GNNTrainer:
    """Trains :class:`GNNNet`; implements :class:`aqimodels.training.core.Trainer`.

    Defaults: every station a neighbour, 2 attention layers (GATv2, 4 heads), 30 epochs, Adam lr 2e-3, batch 64, patience 5,
    hidden 64, station embedding 4, dropout 0.1, gradient clip 1.0, at most 4096 training
    windows per epoch. After ``fit``, ``edge_index``/``edge_weight`` hold the station graph.
    """

    name = "gnn"

    def __init__(self) -> None:
        self.forecaster: Forecaster | None = None
        self.convergence: dict[str, float] = {}
        self.edge_index: np.ndarray | None = None
        self.edge_weight: np.ndarray | None = None

    def fit(
        self, features: FeatureSet, config: TrainConfig, stop: threading.Event
    ) -> Iterator[EpochFinished]:
        """Yields one ``EpochFinished`` per epoch; fills ``forecaster`` and ``convergence`` at the end."""
        settings = LoopSettings.from_config(config)
        n_stations = features.train.x.shape[2]
        if np.asarray(features.coords).shape != (n_stations, 2):
            raise ValueError(f"coords must be [{n_stations}, 2], got {np.asarray(features.coords).shape}")
        self.edge_index, self.edge_weight = knn_graph(
            features.coords, extra_int(config, "k_neighbors", n_stations - 1)
        )
        seed_everything(settings.seed)
        module = GNNNet(
            n_features=features.train.x.shape[3],
            n_stations=n_stations,
            horizon=features.horizon,
            edge_index=self.edge_index,
            edge_weight=self.edge_weight,
            hidden_size=config.hidden_size or DEFAULT_HIDDEN_SIZE,
            embedding_dim=extra_int(config, "station_embedding_dim", 4),
            dropout=extra_float(config, "dropout", 0.1),
            conv=config.extra.get("conv", DEFAULT_CONV) or DEFAULT_CONV,
        )
        result = yield from train_loop(module, features, settings, stop)
        self.forecaster = result.forecaster
        self.convergence = result.convergence
