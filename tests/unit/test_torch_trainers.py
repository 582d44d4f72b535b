"""LSTM and GNN trainers on a hand-built toy FeatureSet (no dependency on features.py).

The toy: one AR(1) + daily-cycle PM2.5 signal that reaches the stations one after another
(each station lags its western neighbour by ``lag`` hours), stations 0.1 degree apart on a
line, a few NaN targets, scaled PM2.5 + hour-of-day + pure-noise input features.
"""

from __future__ import annotations

import pickle
import threading
import time

import cloudpickle
import numpy as np
import pytest
import torch
from aqimodels.training.core import EpochFinished, FeatureSet, Split, TrainConfig, TrainingCancelled
from aqimodels.training.trainers._torch_loop import LoopSettings, TorchForecaster, masked_mse
from aqimodels.training.trainers.gnn import GNNNet, GNNTrainer, haversine_km, knn_graph
from aqimodels.training.trainers.lstm import LSTMTrainer

TRAINERS = {"lstm": LSTMTrainer, "gnn": GNNTrainer}
FAST = {"max_epochs": 8, "hidden_size": 32, "learning_rate": 3e-3, "early_stopping_patience": 100}


def make_features(
    n_stations: int = 4,
    days: int = 40,
    window: int = 24,
    horizon: int = 24,
    lag: int = 3,
    n_noise: int = 2,
    nan_frac: float = 0.02,
    seed: int = 0,
) -> FeatureSet:
    rng = np.random.default_rng(seed)
    hours = days * 24
    total = hours + lag * n_stations + 1
    ar = np.zeros(total)
    for t in range(1, total):
        ar[t] = 0.97 * ar[t - 1] + rng.normal()
    driver = 60 + 25 * np.sin(2 * np.pi * np.arange(total) / 24) + 8 * ar
    # Station 0 leads; station s sees the same air s * lag hours later.
    pm = np.stack(
        [driver[lag * (n_stations - s) : lag * (n_stations - s) + hours] for s in range(n_stations)], 1
    )
    pm = np.clip(pm + rng.normal(0, 2, pm.shape), 1, None)
    n_train_hours = int(hours * 0.6)
    mean, std = float(pm[:n_train_hours].mean()), float(pm[:n_train_hours].std())
    hod = np.arange(hours) % 24
    columns = [
        (pm - mean) / std,
        np.repeat(np.sin(2 * np.pi * hod / 24)[:, None], n_stations, 1),
        np.repeat(np.cos(2 * np.pi * hod / 24)[:, None], n_stations, 1),
    ] + [rng.normal(size=pm.shape) for _ in range(n_noise)]
    feats = np.stack(columns, axis=-1).astype(np.float32)
    origins = np.arange(window - 1, hours - horizon)
    x = np.stack([feats[t - window + 1 : t + 1] for t in origins])
    y = np.stack([pm[t + 1 : t + 1 + horizon].T for t in origins]).astype(np.float32)
    y[rng.random(y.shape) < nan_frac] = np.nan
    last = pm[origins].astype(np.float32)
    times = np.datetime64("2024-01-01T00") + origins.astype("timedelta64[h]")
    n = len(origins)
    a, b = int(n * 0.6), int(n * 0.8)

    def split(sl: slice) -> Split:
        return Split(x=x[sl], y=y[sl], last_pm25=last[sl], times=times[sl])

    return FeatureSet(
        stations=[f"s{i}" for i in range(n_stations)],
        coords=np.stack([np.full(n_stations, 39.9), 116.0 + 0.1 * np.arange(n_stations)], 1),
        feature_names=["pm25", "hour_sin", "hour_cos"] + [f"noise{i}" for i in range(n_noise)],
        window=window,
        horizon=horizon,
        train=split(slice(0, a)),
        val=split(slice(a, b)),
        test=split(slice(b, n)),
        target_mean=mean,
        target_std=std,
    )


def masked_rmse(pred: np.ndarray, y: np.ndarray) -> float:
    mask = ~np.isnan(y)
    return float(np.sqrt(np.mean((pred[mask] - y[mask]) ** 2)))


@pytest.fixture(scope="module")
def toy() -> FeatureSet:
    return make_features()


class Fitted:
    def __init__(
        self, trainer: LSTMTrainer | GNNTrainer, events: list[EpochFinished], seconds: float
    ) -> None:
        self.trainer, self.events, self.seconds = trainer, events, seconds


@pytest.fixture(scope="module", params=sorted(TRAINERS))
def fitted(request: pytest.FixtureRequest, toy: FeatureSet) -> Fitted:
    trainer = TRAINERS[request.param]()
    started = time.monotonic()
    events = list(trainer.fit(toy, TrainConfig(**FAST), threading.Event()))  # type: ignore[arg-type]
    return Fitted(trainer, events, time.monotonic() - started)


# ---- the training contract ----


def test_one_event_per_epoch_in_order(fitted: Fitted) -> None:
    events = fitted.events
    assert all(isinstance(e, EpochFinished) for e in events)
    assert [e.epoch for e in events] == list(range(1, FAST["max_epochs"] + 1))
    assert {e.total_epochs for e in events} == {FAST["max_epochs"]}
    assert all(np.isfinite(e.loss) and np.isfinite(e.validation_rmse) for e in events)
    elapsed = [e.elapsed_seconds for e in events]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0


def test_convergence_is_filled(fitted: Fitted) -> None:
    conv = fitted.trainer.convergence
    assert conv["epochs_run"] == FAST["max_epochs"]
    assert conv["early_stopped"] == 0
    assert conv["final_loss"] == pytest.approx(fitted.events[-1].loss)
    best = min(fitted.events, key=lambda e: e.validation_rmse)
    assert conv["best_epoch"] == best.epoch


def test_training_loss_decreases(fitted: Fitted) -> None:
    losses = [e.loss for e in fitted.events]
    assert losses[-1] < 0.7 * losses[0]
    assert min(e.validation_rmse for e in fitted.events) < fitted.events[0].validation_rmse


def test_predict_shape_and_units(fitted: Fitted, toy: FeatureSet) -> None:
    assert fitted.trainer.forecaster is not None
    pred = fitted.trainer.forecaster.predict(toy.test.x)
    assert pred.shape == toy.test.y.shape == (len(toy.test), 4, 24)
    assert pred.dtype == np.float32 and np.all(np.isfinite(pred))
    # µg/m³, not scaled units: the level and spread match the observations.
    assert abs(float(pred.mean()) - float(np.nanmean(toy.test.y))) < 0.3 * toy.target_std
    assert 0.3 * toy.target_std < float(pred.std()) < 2 * toy.target_std


def test_predictions_come_from_the_best_weights(fitted: Fitted, toy: FeatureSet) -> None:
    assert fitted.trainer.forecaster is not None
    val_rmse = masked_rmse(fitted.trainer.forecaster.predict(toy.val.x), toy.val.y)
    assert val_rmse == pytest.approx(min(e.validation_rmse for e in fitted.events), rel=1e-4)


def test_beats_persistence_on_held_out_test(fitted: Fitted, toy: FeatureSet) -> None:
    assert fitted.trainer.forecaster is not None
    persistence = np.repeat(toy.test.last_pm25[:, :, None], toy.horizon, axis=2)
    model = masked_rmse(fitted.trainer.forecaster.predict(toy.test.x), toy.test.y)
    assert model < 0.85 * masked_rmse(persistence, toy.test.y)


@pytest.mark.parametrize("dumps, loads", [(pickle.dumps, pickle.loads), (cloudpickle.dumps, pickle.loads)])
def test_forecaster_survives_pickling(fitted: Fitted, toy: FeatureSet, dumps, loads) -> None:  # type: ignore[no-untyped-def]
    forecaster = fitted.trainer.forecaster
    assert isinstance(forecaster, TorchForecaster)
    before = forecaster.predict(toy.test.x)
    restored = loads(dumps(forecaster))
    assert restored is not forecaster
    np.testing.assert_array_equal(restored.predict(toy.test.x), before)
    # Batching does not change the answer.
    restored.batch_size = 7
    np.testing.assert_allclose(restored.predict(toy.test.x), before, rtol=1e-5, atol=1e-3)


def test_only_the_gnn_sees_other_stations(fitted: Fitted, toy: FeatureSet) -> None:
    """The LSTM forecasts each station from its own window; the GNN also from its neighbours'."""
    assert fitted.trainer.forecaster is not None
    x = toy.test.x[:50].copy()
    base = fitted.trainer.forecaster.predict(x)
    x[:, :, 1, :] += 2.0
    moved = np.abs(fitted.trainer.forecaster.predict(x) - base)
    assert moved[:, 1].max() > 0.1
    if fitted.trainer.name == "lstm":
        assert moved[:, 0].max() < 1e-3 and moved[:, 2:].max() < 1e-3
    else:
        assert moved[:, 0].max() > 0.1 and moved[:, 2].max() > 0.1


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_same_seed_same_model(name: str, toy: FeatureSet) -> None:
    preds = []
    for seed in (3, 3, 4):
        trainer = TRAINERS[name]()
        cfg = TrainConfig(max_epochs=1, hidden_size=16, seed=seed)
        list(trainer.fit(toy, cfg, threading.Event()))
        assert trainer.forecaster is not None
        preds.append(trainer.forecaster.predict(toy.val.x[:20]))
    np.testing.assert_array_equal(preds[0], preds[1])
    assert not np.array_equal(preds[0], preds[2])


# ---- early stopping and cancellation ----


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_early_stopping_with_small_patience(name: str) -> None:
    # Many noise inputs and a high learning rate: the model overfits within a few epochs.
    toy = make_features(n_noise=12, days=30, seed=1)
    trainer = TRAINERS[name]()
    cfg = TrainConfig(max_epochs=40, learning_rate=1e-2, early_stopping_patience=2, hidden_size=32)
    events = list(trainer.fit(toy, cfg, threading.Event()))
    conv = trainer.convergence
    assert conv["early_stopped"] == 1
    assert len(events) == conv["epochs_run"] < 40
    assert conv["epochs_run"] == conv["best_epoch"] + 2
    best = min(events, key=lambda e: e.validation_rmse)
    assert best.epoch == conv["best_epoch"]
    assert trainer.forecaster is not None
    restored = masked_rmse(trainer.forecaster.predict(toy.val.x), toy.val.y)
    assert restored == pytest.approx(best.validation_rmse, rel=1e-4)
    assert restored < events[-1].validation_rmse


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_stop_before_training_cancels(name: str, toy: FeatureSet) -> None:
    stop = threading.Event()
    stop.set()
    trainer = TRAINERS[name]()
    with pytest.raises(TrainingCancelled):
        next(iter(trainer.fit(toy, TrainConfig(**FAST), stop)))  # type: ignore[arg-type]
    assert trainer.forecaster is None


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_stop_between_epochs_cancels(name: str, toy: FeatureSet) -> None:
    stop = threading.Event()
    trainer = TRAINERS[name]()
    it = iter(trainer.fit(toy, TrainConfig(**FAST), stop))  # type: ignore[arg-type]
    assert next(it).epoch == 1
    stop.set()
    with pytest.raises(TrainingCancelled):
        next(it)
    assert trainer.forecaster is None


class _SetAfter(threading.Event):
    """An event that reports set from its ``n``-th ``is_set`` call on."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.calls, self.n = 0, n

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_stop_is_checked_within_an_epoch(name: str, toy: FeatureSet) -> None:
    # ~550 samples / batch 16 = 35 batches, checked every 4: stopping at the 3rd check
    # happens in the middle of epoch 1, before any event.
    stop = _SetAfter(3)
    cfg = TrainConfig(max_epochs=2, batch_size=16, hidden_size=16, extra={"stop_check_every": "4"})
    with pytest.raises(TrainingCancelled):
        next(iter(TRAINERS[name]().fit(toy, cfg, stop)))
    assert stop.calls == 3


# ---- pieces ----


def test_masked_mse_ignores_masked_cells() -> None:
    pred = torch.tensor([[1.0, 2.0, 100.0]])
    target = torch.tensor([[1.0, 4.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    assert masked_mse(pred, target, mask).item() == pytest.approx(2.0)
    assert masked_mse(pred, target, torch.zeros_like(mask)).item() == 0.0


def test_settings_honour_config_and_defaults() -> None:
    d = LoopSettings.from_config(TrainConfig())
    assert (d.max_epochs, d.learning_rate, d.batch_size, d.patience, d.seed) == (30, 2e-3, 64, 5, 42)
    cfg = TrainConfig(
        max_epochs=3,
        learning_rate=0.1,
        batch_size=8,
        early_stopping_patience=1,
        seed=7,
        extra={"max_train_samples": "100", "num_threads": "16"},
    )
    s = LoopSettings.from_config(cfg)
    assert (s.max_epochs, s.learning_rate, s.batch_size, s.patience, s.seed) == (3, 0.1, 8, 1, 7)
    assert s.max_train_samples == 100 and s.num_threads == 2


def test_max_train_samples_caps_an_epoch(toy: FeatureSet) -> None:
    """With 64 samples per epoch the loop runs one batch; the result is still a trained model."""
    calls = []
    trainer = LSTMTrainer()
    cfg = TrainConfig(max_epochs=1, batch_size=64, hidden_size=16, extra={"max_train_samples": "64"})
    stop = _SetAfter(10**9)
    list(trainer.fit(toy, cfg, stop))
    calls.append(stop.calls)
    cfg_all = TrainConfig(max_epochs=1, batch_size=64, hidden_size=16, extra={"stop_check_every": "1"})
    stop_all = _SetAfter(10**9)
    list(LSTMTrainer().fit(toy, cfg_all, stop_all))
    n_batches = -(-len(toy.train) // 64)
    # 1 check per epoch + 1 per batch (every batch here) + 1 at the end.
    assert stop_all.calls == n_batches + 2
    assert calls[0] == 1 + 1 + 1


def test_knn_graph_on_a_line() -> None:
    # Four stations on the equator at longitudes 0, 1, 3, 10: with k=1 the nearest-neighbour
    # pairs are 0-1, 1-0, 2-1 and 3-2, i.e. undirected edges {0-1, 1-2, 2-3}.
    coords = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 10.0]])
    edge_index, edge_weight = knn_graph(coords, k=1)
    pairs = {(int(a), int(b)): float(w) for a, b, w in zip(*edge_index, edge_weight, strict=True)}
    assert set(pairs) == {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)}
    assert pairs[(0, 1)] == pytest.approx(1.0)
    assert pairs[(1, 2)] == pytest.approx(0.5)
    assert pairs[(2, 3)] == pytest.approx(1 / 7)
    assert all(pairs[(a, b)] == pairs[(b, a)] for a, b in pairs)


def test_knn_graph_k3_is_symmetric_and_bounded() -> None:
    rng = np.random.default_rng(0)
    coords = np.column_stack([39.9 + rng.uniform(-0.3, 0.3, 12), 116.4 + rng.uniform(-0.3, 0.3, 12)])
    edge_index, edge_weight = knn_graph(coords, k=3)
    pairs = set(map(tuple, edge_index.T.tolist()))
    assert all((b, a) in pairs for a, b in pairs)
    assert all(a != b for a, b in pairs)
    degree = np.bincount(edge_index[0], minlength=12)
    assert degree.min() >= 3
    # Between 12*3 (all mutual) and 2*12*3 (none mutual) directed edges.
    assert 36 <= edge_index.shape[1] <= 72
    assert edge_weight.max() == pytest.approx(1.0) and edge_weight.min() > 0
    # Brute force: an edge iff one end is among the other's 3 nearest.
    dist = haversine_km(coords) + np.diag(np.full(12, np.inf))
    knn = np.argsort(dist, axis=1)[:, :3]
    expected = {(i, int(j)) for i in range(12) for j in knn[i]}
    expected |= {(b, a) for a, b in expected}
    assert pairs == expected


def test_knn_graph_small_station_counts() -> None:
    ei, ew = knn_graph(np.array([[39.9, 116.4]]), k=3)
    assert ei.shape == (2, 0) and ew.shape == (0,)
    ei, _ = knn_graph(np.array([[39.9, 116.4], [40.0, 116.5]]), k=3)
    assert ei.shape == (2, 2)


def test_haversine_known_distance() -> None:
    # One degree of longitude on the equator is 111.19 km.
    assert haversine_km(np.array([[0.0, 0.0], [0.0, 1.0]]))[0, 1] == pytest.approx(111.195, rel=1e-4)


def test_gnn_trainer_joins_every_station_by_default(toy: FeatureSet) -> None:
    trainer = GNNTrainer()
    list(trainer.fit(toy, TrainConfig(max_epochs=1, hidden_size=8), threading.Event()))
    assert trainer.edge_index is not None and trainer.edge_weight is not None
    # 4 stations: every station is connected to every other.
    assert trainer.edge_index.shape == (2, 12)
    # Equal spacing on a line: weights are 1 (neighbours), 1/2 and 1/3.
    np.testing.assert_allclose(sorted(set(np.round(trainer.edge_weight, 4))), [0.3333, 0.5, 1.0], atol=1e-3)
    list(
        trainer.fit(
            toy, TrainConfig(max_epochs=1, hidden_size=8, extra={"k_neighbors": "1"}), threading.Event()
        )
    )
    assert trainer.edge_index.shape == (2, 6)


@pytest.mark.parametrize("conv", ["gat", "gcn"])
def test_gnn_layers_and_pickles_from_before_attention(conv: str) -> None:
    edge_index, edge_weight = knn_graph(np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0]]), k=2)
    net = GNNNet(n_features=2, n_stations=3, horizon=4, edge_index=edge_index, edge_weight=edge_weight, conv=conv)
    x = torch.randn(5, 6, 3, 2)
    assert net(x).shape == (5, 3, 4)
    if conv == "gcn":  # a model pickled before conv_kind existed was a GCN: it still predicts the same
        old = pickle.loads(pickle.dumps(net))
        del old.conv_kind
        net.eval(), old.eval()
        torch.testing.assert_close(old(x), net(x))


def test_an_unknown_gnn_layer_is_invalid_argument() -> None:
    from aqimodels.client.errors import InvalidArgumentError

    edge_index, edge_weight = knn_graph(np.array([[0.0, 0.0], [0.0, 1.0]]), k=1)
    with pytest.raises(InvalidArgumentError, match="conv must be gat or gcn"):
        GNNNet(n_features=2, n_stations=2, horizon=4, edge_index=edge_index, edge_weight=edge_weight, conv="gin")


def test_batched_graph_offsets_each_sample() -> None:
    edge_index, edge_weight = knn_graph(np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 3.0]]), k=1)
    net = GNNNet(n_features=2, n_stations=3, horizon=4, edge_index=edge_index, edge_weight=edge_weight)
    ei, ew = net.batched_graph(5)
    assert ei.shape == (2, 5 * edge_index.shape[1]) and ew.shape == (5 * edge_index.shape[1],)
    e = edge_index.shape[1]
    for b in range(5):
        np.testing.assert_array_equal(ei[:, b * e : (b + 1) * e].numpy(), edge_index + 3 * b)
    assert int(ei.max()) == 5 * 3 - 1
    assert net(torch.zeros(5, 6, 3, 2)).shape == (5, 3, 4)
    # The cache is not pickled.
    assert pickle.loads(pickle.dumps(net))._batched == {}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_defaults_on_default_sized_data(name: str) -> None:
    """Default settings on data shaped like the default synthetic dataset (6 stations x 90 days, 20 features)."""
    toy = make_features(n_stations=6, days=90, n_noise=17)
    trainer = TRAINERS[name]()
    started = time.monotonic()
    events = list(trainer.fit(toy, TrainConfig(), threading.Event()))
    seconds = time.monotonic() - started
    assert trainer.forecaster is not None
    persistence = np.repeat(toy.test.last_pm25[:, :, None], toy.horizon, axis=2)
    model = masked_rmse(trainer.forecaster.predict(toy.test.x), toy.test.y)
    print(
        f"{name}: {len(events)} epochs in {seconds:.1f} s, test rmse {model:.2f} vs persistence "
        f"{masked_rmse(persistence, toy.test.y):.2f}"
    )
    assert model < masked_rmse(persistence, toy.test.y)


@pytest.mark.slow
def test_gnn_beats_lstm_at_6h_when_neighbours_lead() -> None:
    """Same encoder, head and budget; only the GNN can read the upstream station, 3 h ahead."""
    toy = make_features(n_stations=4, days=60, seed=2)
    cfg = TrainConfig(max_epochs=15, hidden_size=32, early_stopping_patience=4)
    rmse_6h = {}
    for name, cls in TRAINERS.items():
        trainer = cls()
        list(trainer.fit(toy, cfg, threading.Event()))
        assert trainer.forecaster is not None
        pred = trainer.forecaster.predict(toy.test.x)
        rmse_6h[name] = masked_rmse(pred[:, :, 5], toy.test.y[:, :, 5])
    assert rmse_6h["gnn"] < 0.95 * rmse_6h["lstm"], rmse_6h


def test_torch_threads_are_capped_during_fit_and_predict_and_restored(toy: FeatureSet) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer = LSTMTrainer()
        seen = [
            torch.get_num_threads()
            for _ in trainer.fit(toy, TrainConfig(max_epochs=2, hidden_size=8), threading.Event())
        ]
        assert seen == [1, 1]
        assert torch.get_num_threads() == 2
        assert trainer.forecaster is not None
        trainer.forecaster.predict(toy.val.x[:4])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
