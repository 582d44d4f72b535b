"""The graph network at inference: the LSTM's station encoder, attention layers over stations.

See ``aqimodels.training.trainers.gnn`` for the design and its measurements.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch_geometric.nn import GATv2Conv, GCNConv

from .errors import InputError
from .nets import DEFAULT_HIDDEN_SIZE, ForecastHead, StationEncoder

DEFAULT_CONV = "gat"
ATTENTION_HEADS = 4


class GNNNet(nn.Module):
    """``[B, window, S, F]`` scaled windows -> ``[B, S, H]`` scaled target over the station graph."""

    edge_index: torch.Tensor
    edge_weight: torch.Tensor

    def __init__(self, n_features: int, n_stations: int, horizon: int, edge_index: np.ndarray,
                 edge_weight: np.ndarray, hidden_size: int = DEFAULT_HIDDEN_SIZE, embedding_dim: int = 4,
                 dropout: float = 0.1, n_layers: int = 2, conv: str = DEFAULT_CONV) -> None:
        super().__init__()
        if conv not in ("gat", "gcn"):
            raise InputError(f"gnn parameter conv must be gat or gcn, got {conv!r}", field="config")
        self.init_args = {"n_features": n_features, "n_stations": n_stations, "horizon": horizon,
                          "hidden_size": hidden_size, "embedding_dim": embedding_dim, "dropout": dropout,
                          "n_layers": n_layers, "conv": conv}
        self.n_stations = n_stations
        self.conv_kind = conv
        self.encoder = StationEncoder(n_features, n_stations, hidden_size, embedding_dim)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(n_layers))
        self.convs = nn.ModuleList(
            GATv2Conv(hidden_size, hidden_size, heads=ATTENTION_HEADS, concat=False, edge_dim=1) if conv == "gat"
            else GCNConv(hidden_size, hidden_size) for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)
        self.head = ForecastHead(hidden_size, n_features, horizon, dropout)
        self.register_buffer("edge_index", torch.as_tensor(np.asarray(edge_index), dtype=torch.long))
        self.register_buffer("edge_weight", torch.as_tensor(np.asarray(edge_weight), dtype=torch.float32))
        self._batched: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def batched_graph(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` copies of the station graph as one disjoint graph (node ``b * S + s``)."""
        cached = self._batched.get(batch)
        if cached is None:
            offsets = torch.arange(batch, dtype=torch.long) * self.n_stations
            edge_index = (self.edge_index[:, None, :] + offsets[None, :, None]).reshape(2, -1)
            cached = (edge_index, self.edge_weight.repeat(batch))
            self._batched[batch] = cached
        return cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        edge_index, edge_weight = self.batched_graph(x.shape[0])
        # Models pickled before attention have no conv_kind: they were built with GCNConv.
        edge_attr = edge_weight[:, None] if getattr(self, "conv_kind", "gcn") == "gat" else edge_weight
        for norm, conv in zip(self.norms, self.convs, strict=True):
            h = h + self.dropout(torch.relu(conv(norm(h), edge_index, edge_attr)))
        out: torch.Tensor = self.head(h, x)
        return out

    def __getstate__(self) -> dict[str, Any]:
        # The per-batch-size graphs are a cache: keep pickles small, rebuild on demand.
        state = self.__dict__.copy()
        state["_batched"] = {}
        return state
