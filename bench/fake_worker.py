"""A benchmark-only TrainingWorker: streams synthetic TrainEvents as fast as asked, trains nothing.

Registered as the registry's worker, it measures the relay itself (worker -> registry -> client)
without a trainer's cost in the way. ``params.max_epochs`` is the number of epoch events,
``params.extra["bench.interval_ms"]`` the pause between them (0: back to back) and
``params.extra["bench.version"]`` an existing version of the model that it reports as
registered. Every event carries the worker's send time (``TrainEvent.time``).

Usage: ``python -m bench.fake_worker --port-file PATH``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.api.training.v1 import worker_pb2_grpc

TYPE_NAMES = {wpb.MODEL_TYPE_XGBOOST: "xgboost", wpb.MODEL_TYPE_LSTM: "lstm", wpb.MODEL_TYPE_GNN: "gnn",
              wpb.MODEL_TYPE_ENSEMBLE: "ensemble"}


class FakeWorker(worker_pb2_grpc.TrainingWorkerServicer):
    def __init__(self) -> None:
        self.running = 0
        self.lock = threading.Lock()
        self.start = time.time()

    def Train(self, request: wpb.TrainRequest, context: grpc.ServicerContext) -> Any:
        n = request.params.max_epochs or 100
        interval = float(request.params.extra.get("bench.interval_ms", "0")) / 1000
        version = int(request.params.extra.get("bench.version", "1"))
        name = request.registered_model_name or f"aqi_predictor_{TYPE_NAMES.get(request.model_type, 'xgboost')}"
        with self.lock:
            self.running += 1
        try:
            seq = 1
            ev = wpb.TrainEvent(sequence=seq, started=wpb.TrainStarted(run_id=uuid.uuid4().hex, total_steps=n,
                                                                       worker_id="bench-fake"))
            ev.time.GetCurrentTime()
            yield ev
            t0 = time.perf_counter()
            for epoch in range(1, n + 1):
                if interval:
                    time.sleep(interval)
                if not context.is_active():
                    return
                seq += 1
                ev = wpb.TrainEvent(sequence=seq, epoch=wpb.EpochFinished(
                    epoch=epoch, total_epochs=n, loss=1.0 / epoch, validation_rmse=20.0 + 10.0 / epoch,
                    elapsed_seconds=time.perf_counter() - t0))
                ev.time.GetCurrentTime()
                yield ev
            seq += 1
            ev = wpb.TrainEvent(sequence=seq, finished=wpb.TrainFinished(
                model_name=name, version=version, run_id="", model_uri=f"models:/{name}/{version}",
                metrics={"rmse": 20.0}, training_seconds=time.perf_counter() - t0))
            ev.time.GetCurrentTime()
            yield ev
        finally:
            with self.lock:
                self.running -= 1

    def ValidateDataset(self, request: wpb.ValidateDatasetRequest, context: grpc.ServicerContext) -> Any:
        out = wpb.ValidateDatasetResponse(stations=6, hours=2160, fingerprint="bench")
        out.start_time.FromSeconds(1_700_000_000)
        out.end_time.FromSeconds(1_700_000_000 + 2160 * 3600)
        return out

    def GetWorkerInfo(self, request: wpb.GetWorkerInfoRequest, context: grpc.ServicerContext) -> Any:
        out = wpb.GetWorkerInfoResponse(worker_id=f"bench-fake:{os.getpid()}", model_types=list(TYPE_NAMES),
                                        capacity=64, running=self.running)
        out.start_time.FromSeconds(int(self.start))
        return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=80), options=[("grpc.so_reuseport", 0)])
    worker_pb2_grpc.add_TrainingWorkerServicer_to_server(FakeWorker(), server)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    Path(args.port_file).write_text(str(port))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
