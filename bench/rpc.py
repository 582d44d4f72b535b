"""Section 1: registry RPCs against MLflow's own paths and the gRPC ceiling.

Every system answers the same question on the same database, measured from this process (a
client process separate from every server), interleaved run by run so that the ratios compare
calls made side by side:

- ``aqimodels``: the registry (``aqimodels serve``, its own process) over gRPC, driven from one
  asyncio loop (``common.AioLoad``: a client that costs the machine less per call than threads);
- ``inproc``: the same answer assembled with MlflowClient in this process;
- ``rest``: the same MlflowClient code against ``mlflow server`` over REST on the same database,
  with its default workers, and ``rest_w1`` with ``--workers 1`` (both with job execution off);
- ``noop``: the gRPC health Check on the same registry server (the ceiling).
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common, data

PAGE = 100
METRIC = "rmse"


class GrpcOps:
    """The registry's RPCs over one channel (raw stubs: what any generated client does)."""

    def __init__(self, target: str) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from aqimodels.api.registry.v1 import registry_pb2 as pb
        from aqimodels.api.registry.v1 import registry_pb2_grpc

        self.pb = pb
        self.target = target
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = registry_pb2_grpc.ModelRegistryStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._check = health_pb2.HealthCheckRequest()
        self._status = pb.GetStatusRequest()
        self.load = common.AioLoad()
        self.load.run(self._open_aio(target))

    async def _open_aio(self, target: str) -> None:
        """The same stubs on a grpc.aio channel, on the load's event loop (where they must be used)."""
        import grpc
        from grpc_health.v1 import health_pb2_grpc

        from aqimodels.api.registry.v1 import registry_pb2_grpc

        self.aio_channel = grpc.aio.insecure_channel(self.target,
                                                     options=[("grpc.max_receive_message_length", 64 << 20)])
        self.aio_stub = registry_pb2_grpc.ModelRegistryStub(self.aio_channel)
        self.aio_health = health_pb2_grpc.HealthStub(self.aio_channel)

    def _rpc(self, op: str, *args: Any) -> tuple[str, str, Any, float]:
        """(service, method, request, timeout) of ``op``: the same request from either channel."""
        pb = self.pb
        if op == "noop":
            return "health", "Check", self._check, 30
        if op == "status":
            return "registry", "GetStatus", self._status, 60
        if op == "status_page":  # one page of a dashboard: the first args[0] models
            return "registry", "GetStatus", pb.GetStatusRequest(page_size=args[0]), 60
        if op == "list_page":
            return "registry", "ListModelVersions", pb.ListModelVersionsRequest(
                name=args[0], page_size=PAGE, page_token=args[1] if len(args) > 1 else ""), 60
        if op == "compare":
            return "registry", "CompareModelVersions", pb.CompareModelVersionsRequest(name=args[0], metric=METRIC), 60
        raise ValueError(f"unknown operation {op!r}")

    def _send(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        service, method, request, default = self._rpc(op, *args)
        stub = self.health if service == "health" else self.stub
        return getattr(stub, method)(request, timeout=timeout or default)

    def measured(self, op: str, *args: Any) -> Aio:
        """``op`` (noop, status, status_page, list_page, compare) as measured under load: from the event loop."""
        service, method, request, timeout = self._rpc(op, *args)
        send = getattr(self.aio_health if service == "health" else self.aio_stub, method)
        return Aio(self.load, lambda: send(request, timeout=timeout), lambda: self._send(op, *args))

    def noop(self) -> Any:
        return self._send("noop")

    def status(self, timeout: float = 60) -> Any:
        return self._send("status", timeout=timeout)

    def cold_status(self) -> float:
        """Seconds of the first GetStatus after start (the read model loads every model)."""
        t0 = time.perf_counter()
        self.status(timeout=900)
        return time.perf_counter() - t0

    def list_page(self, name: str, token: str = "") -> Any:
        return self._send("list_page", name, token)

    def last_token(self, name: str) -> str:
        """The token of the last page (tokens are reusable)."""
        token = ""
        while True:
            nxt = self.list_page(name, token).next_page_token
            if not nxt:
                return token
            token = nxt

    def compare(self, name: str) -> Any:
        return self._send("compare", name)

    def promote(self, name: str, version: int) -> Any:
        return self.stub.PromoteModelVersion(
            self.pb.PromoteModelVersionRequest(name=name, version=version, stage=self.pb.STAGE_PRODUCTION),
            timeout=60, metadata=(("x-request-id", uuid.uuid4().hex),))

    def close(self) -> None:
        self.channel.close()
        self.load.run(self.aio_channel.close())
        self.load.close()


class Aio:
    """An operation measured from an asyncio loop; calling it runs the plain stub (warm-up, checks)."""

    def __init__(self, load: common.AioLoad, call: Callable[[], Any], sync: Callable[[], Any]) -> None:
        self.load, self.call, self.sync = load, call, sync

    def __call__(self) -> Any:
        return self.sync()


class MlflowOps:
    """The same answers assembled with MlflowClient (in-process on the file, or over REST)."""

    def __init__(self, uri: str, models: tuple[str, ...] = data.MODELS) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.models = models
        self._exp_ids: list[str] | None = None

    def _metrics(self, run_ids: list[str]) -> dict[str, dict[str, float]]:
        if self._exp_ids is None:
            self._exp_ids = [e.experiment_id for e in self.client.search_experiments()]
        out: dict[str, dict[str, float]] = {}
        for i in range(0, len(run_ids), 100):
            chunk = run_ids[i:i + 100]
            quoted = ", ".join(f"'{r}'" for r in chunk)
            for run in self.client.search_runs(self._exp_ids, f"attributes.run_id IN ({quoted})",
                                               max_results=len(chunk)):
                out[run.info.run_id] = run.data.metrics
        return out

    def status(self) -> list[Any]:
        """For each model: production and latest version with their run metrics."""
        out = []
        for name in self.models:
            prod = self.client.get_model_version_by_alias(name, "production")
            latest = self.client.search_model_versions(f"name='{name}'", max_results=1,
                                                       order_by=["version_number DESC"])[0]
            out.append((prod, self.client.get_run(prod.run_id).data.metrics,
                        latest, self.client.get_run(latest.run_id).data.metrics))
        return out

    def list_page(self, name: str, token: str | None = None) -> Any:
        page = self.client.search_model_versions(f"name='{name}'", max_results=PAGE, order_by=["version_number DESC"],
                                                 page_token=token or None)
        return page, self._metrics([v.run_id for v in page])

    def last_token(self, name: str) -> str:
        token = ""
        while True:
            page = self.client.search_model_versions(f"name='{name}'", max_results=PAGE,
                                                     order_by=["version_number DESC"], page_token=token or None)
            if not page.token:
                return token
            token = page.token

    def compare(self, name: str) -> Any:
        versions = []
        token = None
        while True:
            page = self.client.search_model_versions(f"name='{name}'", max_results=1000,
                                                     order_by=["version_number DESC"], page_token=token)
            versions.extend(page)
            token = page.token
            if not token:
                break
        metrics = self._metrics([v.run_id for v in versions])
        scored = sorted((metrics.get(v.run_id, {}).get(METRIC, float("inf")), int(v.version)) for v in versions)
        return scored[0]

    def promote(self, name: str, version: int, previous: int) -> None:
        """A promotion with archiving: the alias, the archive tags and the promotion tags."""
        now = str(int(time.time() * 1000))
        c = self.client
        c.set_registered_model_alias(name, "production", str(version))
        c.set_model_version_tag(name, str(previous), "aqimodels.archived", "true")
        c.set_model_version_tag(name, str(previous), "aqimodels.archived_time", now)
        c.set_model_version_tag(name, str(version), "aqimodels.previous_production", str(previous))
        c.set_model_version_tag(name, str(version), "aqimodels.promoted_time", now)
        try:
            c.delete_model_version_tag(name, str(version), "aqimodels.archived")
        except Exception:  # noqa: BLE001 - the tag was not there
            pass

    def alias(self, name: str, version: int) -> None:
        self.client.set_registered_model_alias(name, "production", str(version))


def _measure(call: Callable[[], Any], conc: int, seconds: float, max_calls: int) -> dict[str, Any]:
    if isinstance(call, Aio):
        r = call.load.closed_loop(call.call, conc, seconds, max_calls=max_calls, min_calls=min(conc, 3))
    else:
        r = common.closed_loop(call, conc, seconds, max_calls=max_calls, min_calls=min(conc, 3))
    if r["errors"]:
        raise RuntimeError(f"{len(r['errors'])} errors, first: {r['errors'][0]}")
    return {"p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "per_second": r["per_second"], "calls": len(r["latencies"])}


def _summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {"p50_ms": common.figure([s["p50_ms"] for s in samples], "ms"),
            "p99_ms": common.figure([s["p99_ms"] for s in samples], "ms"),
            "per_second": common.figure([s["per_second"] for s in samples], "calls/s", 1),
            "calls_per_run": [s["calls"] for s in samples]}


def measure_matrix(ops: dict[str, dict[str, Callable[[], Any]]], plan: dict[str, list[int]], runs: int,
                   seconds: float, max_calls: dict[str, int],
                   op_plan: dict[str, dict[str, list[int]]] | None = None) -> dict[str, Any]:
    """ops[op][system] -> call; plan[system] -> concurrencies (op_plan[op] overrides). Runs interleave."""
    raw: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {}
    for op, systems in ops.items():
        for call in systems.values():
            call()  # warm-up (and a check that it answers)
        concs = {**plan, **(op_plan or {}).get(op, {})}
        for _ in range(runs):
            for system, call in systems.items():
                for conc in concs[system]:
                    s = _measure(call, conc, seconds, max_calls.get(system, 10**9))
                    raw.setdefault(op, {}).setdefault(system, {}).setdefault(conc, []).append(s)
        print(f"  {op}: " + "  ".join(
            f"{sys_}@{c} p50 {statistics.median(x['p50_ms'] for x in v):.1f} ms"
            for sys_, by_c in raw[op].items() for c, v in by_c.items() if c in (1,)), flush=True)
    out: dict[str, Any] = {}
    for op, systems in raw.items():
        out[op] = {system: {f"c{c}": _summarise(v) for c, v in by_c.items()} for system, by_c in systems.items()}
        # ratios, paired run by run: baseline p50 / aqimodels p50 at 1 in flight
        if "aqimodels" in systems:
            aq = systems["aqimodels"].get(1)
            for system, by_c in systems.items():
                if system == "aqimodels" or 1 not in by_c or aq is None:
                    continue
                ratios = [b["p50_ms"] / a["p50_ms"] for a, b in zip(aq, by_c[1], strict=True) if a["p50_ms"] > 0]
                out[op][f"ratio_{system}_over_aqimodels_p50"] = common.figure(ratios, "x", 2)
    return out


def _promotion(aq: GrpcOps, inproc: MlflowOps, rests: dict[str, MlflowOps], runs: int, calls: int) -> dict[str, Any]:
    """Promotions alternate two versions (each archives the other), one model per system."""
    plan: list[tuple[str, str, Callable[[int, int], Any]]] = [
        ("aqimodels", data.MODELS[0], lambda v, p: aq.promote(data.MODELS[0], v)),
        ("inproc_alias_only", data.MODELS[1], lambda v, p: inproc.alias(data.MODELS[1], v)),
        ("inproc_with_archive", data.MODELS[1], lambda v, p: inproc.promote(data.MODELS[1], v, p)),
    ]
    for label, ops in rests.items():
        plan.append((f"{label}_with_archive", data.MODELS[2 if label == "rest" else 3],
                     lambda v, p, o=ops, n=data.MODELS[2 if label == "rest" else 3]: o.promote(n, v, p)))
    samples: dict[str, list[dict[str, Any]]] = {}
    pair = (11, 12)
    for _system, _name, fn in plan:  # warm-up: put one of the pair in production
        fn(pair[0], pair[1])
    for _ in range(runs):
        for system, _name, fn in plan:
            lat = []
            for i in range(calls):
                v, p = (pair[1], pair[0]) if i % 2 == 0 else pair
                t0 = time.perf_counter()
                fn(v, p)
                lat.append(time.perf_counter() - t0)
            samples.setdefault(system, []).append({"p50_ms": common.pct(lat, .5) * 1000,
                                                   "p99_ms": common.pct(lat, .99) * 1000,
                                                   "per_second": len(lat) / sum(lat), "calls": len(lat)})
            if calls % 2:
                fn(pair[0], pair[1])
    out: dict[str, Any] = {s: {"c1": _summarise(v)} for s, v in samples.items()}
    # read-your-writes: a GetStatus right after each of a few promotions already shows the new version
    shows = True
    current = {m.model.name: m.production.version for m in aq.status().models}.get(data.MODELS[0])
    for _ in range(6):
        v = pair[1] if current == pair[0] else pair[0]
        current = v
        aq.promote(data.MODELS[0], v)
        st = {m.model.name: m.production.version for m in aq.status().models}
        shows = shows and st.get(data.MODELS[0]) == v
    out["status_after_promotion_shows_it"] = shows
    aq_s = samples["aqimodels"]
    for system, v in samples.items():
        if system != "aqimodels":
            out[f"ratio_aqimodels_over_{system}_p50"] = common.figure(
                [a["p50_ms"] / b["p50_ms"] for a, b in zip(aq_s, v, strict=True)], "x", 2)
    return out


def run(folder: Path, sizes: tuple[int, ...] = (100, 1000, 10000), runs: int = 3, seconds: float = 1.5,
        with_rest: bool = True) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"sizes": {}, "builds": {}}
    procs: list[Any] = []
    try:
        print("building registries", flush=True)
        for n in sizes:
            b = data.build_sql(folder / f"registry_{n}.db", n, folder)
            data.verify(f"sqlite:///{folder}/registry_{n}.db", n)
            result["builds"][str(n)] = b
            print(f"  4 x {n}: {b['versions_per_second']:.0f} versions/s ({b['seconds']:.1f} s)", flush=True)
        result["builds"]["mlflowclient_sample"] = data.build_with_client(folder, 10)
        main_n = 1000 if 1000 in sizes else sizes[-1]
        uri = f"sqlite:///{folder}/registry_{main_n}.db"
        # --- the main registry (4 x 1,000) against every MLflow path ---
        proc, target, startup = common.start_registry(uri, folder)
        procs.append(proc)
        aq = GrpcOps(target)
        result["first_status_seconds"] = aq.cold_status()
        inproc = MlflowOps(uri)
        rests: dict[str, MlflowOps] = {}
        if with_rest:
            p1, url1, s1 = common.start_mlflow_server(uri, folder)
            procs.append(p1)
            p2, url2, s2 = common.start_mlflow_server(uri, folder, workers=1)
            procs.append(p2)
            rests = {"rest": MlflowOps(url1), "rest_w1": MlflowOps(url2)}
            result["mlflow_server_start_seconds"] = {"default": s1, "workers_1": s2}
        result["registry_start_seconds"] = startup
        name = data.MODELS[1]
        tokens = {"aqimodels": aq.last_token(name), "inproc": inproc.last_token(name)}
        mlflow_systems: dict[str, MlflowOps] = {"inproc": inproc, **rests}
        ops: dict[str, dict[str, Callable[[], Any]]] = {
            "noop": {"aqimodels": aq.measured("noop")},
            "GetStatus": {"aqimodels": aq.measured("status"), **{k: v.status for k, v in mlflow_systems.items()}},
            "ListModelVersions_first": {"aqimodels": aq.measured("list_page", name),
                                        **{k: (lambda o=v: o.list_page(name)) for k, v in mlflow_systems.items()}},
            "ListModelVersions_last": {"aqimodels": aq.measured("list_page", name, tokens["aqimodels"]),
                                       **{k: (lambda o=v: o.list_page(name, tokens["inproc"]))
                                          for k, v in mlflow_systems.items()}},
            "CompareModelVersions": {"aqimodels": aq.measured("compare", name),
                                     **{k: (lambda o=v: o.compare(name)) for k, v in mlflow_systems.items()}},
        }
        plan = {"aqimodels": [1, 8, 32], "inproc": [1, 8], "rest": [1, 8], "rest_w1": [1, 8]}
        print(f"RPCs at 4 x {main_n}", flush=True)
        # all 1,000 versions through MLflow take seconds a call: its baselines at 1 in flight only
        slow = {"inproc": [1], "rest": [1], "rest_w1": [1]}
        result["rpcs"] = measure_matrix(ops, plan, runs, seconds, {"inproc": 60, "rest": 16, "rest_w1": 16},
                                        {"CompareModelVersions": slow})
        result["rpcs"]["PromoteModelVersion"] = _promotion(aq, inproc, rests, runs, 20)
        print("  PromoteModelVersion: " + ", ".join(
            f"{k} {v['c1']['p50_ms']['median']} ms" for k, v in result["rpcs"]["PromoteModelVersion"].items()
            if isinstance(v, dict) and "c1" in v), flush=True)
        result["main_size"] = main_n
        aq.close()
        for p in procs:
            common.stop(p)
        procs.clear()
        # --- cost per page across registry sizes (aqimodels and in-process MlflowClient) ---
        for n in sizes:
            uri_n = f"sqlite:///{folder}/registry_{n}.db"
            proc, target, startup = common.start_registry(uri_n, folder)
            procs.append(proc)
            aq_n = GrpcOps(target)
            first = aq_n.cold_status()
            print(f"  first GetStatus after start: {first:.2f} s", flush=True)
            inproc_n = MlflowOps(uri_n)
            tok = {"aq": aq_n.last_token(name), "in": inproc_n.last_token(name)}
            ops_n = {
                "GetStatus": {"aqimodels": aq_n.measured("status"), "inproc": inproc_n.status},
                "ListModelVersions_first": {"aqimodels": aq_n.measured("list_page", name),
                                            "inproc": lambda o=inproc_n: o.list_page(name)},
                "ListModelVersions_last": {"aqimodels": aq_n.measured("list_page", name, tok["aq"]),
                                           "inproc": lambda o=inproc_n, t=tok: o.list_page(name, t["in"])},
            }
            print(f"sizes: 4 x {n}", flush=True)
            result["sizes"][str(n)] = {"registry_start_seconds": startup, "first_status_seconds": first,
                                       **measure_matrix(ops_n, {"aqimodels": [1, 8], "inproc": [1]}, runs, seconds,
                                                        {"inproc": 40})}
            aq_n.close()
            common.stop(proc)
            procs.clear()
        return result
    finally:
        for p in procs:
            common.stop(p)
