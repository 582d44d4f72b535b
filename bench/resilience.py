"""Failure-safe changes and bounded waits.

- reconcile time of a half-done promotion: in-process (a promotion stopped after its alias move,
  as a crash leaves it, then one reconciler pass) and from outside (a registry that SIGKILLs itself
  after the alias move, restarted: process start -> the audit record completed ``recovered``);
- time for health to turn NOT_SERVING when a private PostgreSQL cluster is frozen with SIGSTOP
  (target <= 2 probe intervals) and to turn SERVING again after SIGCONT, at two probe intervals;
- promotion p50 before and after this change, side by side in one run: the registry of the base
  commit (its sources exported to a temporary folder, first on PYTHONPATH) and this one, each
  against the bare in-process MLflow alias change (bench/rpc.py's promotion benchmark).

    python -m bench.resilience [--runs 3] [--base-commit REV]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from bench import common, data

ROOT = common.ROOT
_TESTS = ROOT / "tests" / "integration"


class _Crash(BaseException):
    """Stops a promotion the way a crash does: no handler of the change runs."""


def _half_done_promotions(folder: Path, runs: int) -> dict[str, Any]:
    from aqimodels.server.app import create_server
    from aqimodels.server.config import ServerConfig
    from aqimodels.server.domain import Stage
    from aqimodels.client.domain import Caller

    shutil.copy(data.migrated_template(folder), folder / "reconcile.db")
    uri = f"sqlite:///{folder}/reconcile.db"
    rs = create_server(ServerConfig(tracking_uri=uri, workers=(), log_json=True, log_level="warning"), "127.0.0.1:0")
    try:
        name = data.MODELS[0]
        versions = [rs.service.store.create_version(name, {"rmse": 20.0 + i}) for i in range(2)]
        rs.service.invalidate(name)
        rs.service.promote(Caller(), name, versions[0], Stage.PRODUCTION, None)

        def crash(action: str, index: int) -> None:
            if index == 2:
                raise _Crash()

        seconds = []
        for i in range(runs * 5):
            target = versions[(i + 1) % 2]
            rs.service.changes.fault = crash
            try:
                rs.service.promote(Caller(), name, target, Stage.PRODUCTION, None)
            except _Crash:
                pass
            rs.service.changes.fault = None
            assert rs.service.db.audit_pending(("PromoteModelVersion",), model_name=name)
            t0 = time.perf_counter()
            settled = rs.service.changes.reconcile(older_than_seconds=None)
            seconds.append(time.perf_counter() - t0)
            assert settled == 1 and not rs.service.db.audit_pending(("PromoteModelVersion",), model_name=name)
            assert rs.service.snapshot(name, fresh=True).model.aliases["production"] == target
        return common.figure([s * 1000 for s in seconds], "ms", 2) | {"note": "one reconciler pass over one half-done promotion "
                                                            "(alias moved, tags not), SQLite, in-process"}
    finally:
        rs.stop(1)


def _after_restart(folder: Path, runs: int) -> dict[str, Any]:
    from aqimodels.client import RegistryClient
    from aqimodels.server.mlflow_store import MlflowModelStore

    shutil.copy(data.migrated_template(folder), folder / "restart.db")
    uri = f"sqlite:///{folder}/restart.db"
    name = data.MODELS[1]
    store = MlflowModelStore(uri)
    versions = [store.create_version(name, {"rmse": 20.0 + i}) for i in range(2)]
    proc, target, _ = common.start_registry(uri, folder)
    with RegistryClient(target) as client:
        client.promote(name, versions[0], "production")
    common.stop(proc)
    to_recovered, starts, after_serving = [], [], []
    for i in range(runs):
        proc, target, _ = common.start_registry(uri, folder, AQIMODELS_FAULT_POINT="PromoteModelVersion:2")
        with RegistryClient(target) as client:
            try:
                client.promote(name, versions[(i + 1) % 2], "production")
            except Exception as exc:  # noqa: BLE001 - the registry killed itself mid-call
                print(f"  the promotion's caller got {type(exc).__name__}", flush=True)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL, proc.returncode
        t0 = time.perf_counter()
        proc, target, start = common.start_registry(uri, folder)
        with RegistryClient(target) as client:
            while any(r.outcome == "pending" for r in client.iter_audit_events(model_name=name)):
                time.sleep(0.01)
            to_recovered.append(time.perf_counter() - t0)
            starts.append(start)
            after_serving.append(to_recovered[-1] - start)
        common.stop(proc)
    return {"restart_to_recovered": common.figure(to_recovered, "s", 2),
            "restart_to_serving": common.figure(starts, "s", 2),
            "recovered_after_serving": common.figure(after_serving, "s", 3),
            "note": "registry SIGKILLed after the alias move; restart on the same SQLite store until the record "
                    "is completed (includes the process start)"}


def _frozen_postgres(runs: int) -> dict[str, Any]:
    sys.path.insert(0, str(_TESTS))  # the tests' private PostgreSQL cluster (never the server on 5432)
    sys.path.insert(0, str(ROOT / "tests"))
    from aqimodels.client import RegistryClient
    from aqimodels.server.app import create_server
    from aqimodels.server.config import ServerConfig
    from test_changes import freeze, thaw
    from test_faults import PG_BIN, ThrowawayPostgres

    if not (PG_BIN / "initdb").exists() or shutil.which("su") is None:
        return {"skipped": "PostgreSQL server binaries are not installed"}
    pg = ThrowawayPostgres()
    out: dict[str, Any] = {}
    try:
        for interval in (0.5, 2.0):
            rs = create_server(replace(ServerConfig(tracking_uri=pg.url, workers=(), log_json=True, log_level="error"),
                                       health_interval_seconds=interval), "127.0.0.1:0")
            client = RegistryClient(f"127.0.0.1:{rs.port}")
            flips, backs = [], []
            try:
                for _ in range(runs):
                    while client.health() != "SERVING":
                        time.sleep(0.01)
                    time.sleep(interval * 0.37)  # freeze at a varying point of the probe cycle
                    pids = freeze(pg)
                    t0 = time.perf_counter()
                    try:
                        while client.health(timeout=1) != "NOT_SERVING":
                            time.sleep(0.005)
                        flips.append(time.perf_counter() - t0)
                    finally:
                        thaw(pids)
                    t1 = time.perf_counter()
                    while client.health() != "SERVING":
                        time.sleep(0.005)
                    backs.append(time.perf_counter() - t1)
            finally:
                client.close()
                rs.stop(1)
            out[f"interval_{interval}"] = {
                "not_serving_after": common.figure(flips, "s", 2),
                "not_serving_in_intervals": common.figure([f / interval for f in flips], "x", 2),
                "serving_again_after": common.figure(backs, "s", 2),
                "health_timeout_s": min(1.0, interval / 2)}
    finally:
        pg.destroy()
    return out


def _export_base(commit: str, folder: Path) -> Path:
    """The registry's sources at ``commit``, laid out as the installed package (api from this tree)."""
    tree = folder / "base"
    pkg = tree / "aqimodels"
    pkg.mkdir(parents=True)
    raw = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "server", "client", "training"],
                         check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        tar.extractall(pkg, filter="data")
    editable = next((ROOT / "build").glob("__editable__*/aqimodels/api"))
    shutil.copytree(editable, pkg / "api", symlinks=False)
    return tree


def _promotion_p50(folder: Path, runs: int, base_commit: str, calls: int = 20) -> dict[str, Any]:
    """Both registries run at once, each on its own copy of one built registry (4 x 1,000); their runs
    alternate (and so does which goes first), each next to a run of the bare alias change on its store."""
    from bench import rpc

    built = folder / "promote.db"
    data.build_sql(built, 1000, folder)
    base = _export_base(base_commit, folder)
    name, pair = data.MODELS[0], (11, 12)
    systems: dict[str, dict[str, Any]] = {}
    try:
        for label, extra in (("base", {"PYTHONPATH": str(base)}), ("this", {})):
            db = folder / f"promote-{label}.db"
            shutil.copy(built, db)
            proc, target, _ = common.start_registry(f"sqlite:///{db}", folder, **extra)
            aq = rpc.GrpcOps(target)
            aq.promote(name, pair[0])
            systems[label] = {"proc": proc, "aq": aq, "inproc": rpc.MlflowOps(f"sqlite:///{db}"), "current": pair[0],
                              "p50": [], "p99": [], "alias": [], "ratio": []}
        for r in range(runs):
            for label in (("base", "this") if r % 2 == 0 else ("this", "base")):
                s = systems[label]
                lat, alias = [], []
                for _ in range(calls):
                    v = pair[1] if s["current"] == pair[0] else pair[0]
                    t0 = time.perf_counter()
                    s["aq"].promote(name, v)
                    lat.append(time.perf_counter() - t0)
                    s["current"] = v
                    t0 = time.perf_counter()
                    s["inproc"].alias(data.MODELS[1], v)
                    alias.append(time.perf_counter() - t0)
                p50, a50 = common.pct(lat, .5) * 1000, common.pct(alias, .5) * 1000
                s["p50"].append(p50)
                s["p99"].append(common.pct(lat, .99) * 1000)
                s["alias"].append(a50)
                s["ratio"].append(p50 / a50)
    finally:
        for s in systems.values():
            s["aq"].close()
            common.stop(s["proc"])
    out: dict[str, Any] = {"base_commit": base_commit, "calls_per_run": calls}
    for label, s in systems.items():
        out[label] = {"aqimodels_p50_ms": common.figure(s["p50"], "ms", 2),
                      "aqimodels_p99_ms": common.figure(s["p99"], "ms", 2),
                      "alias_only_p50_ms": common.figure(s["alias"], "ms", 2),
                      "ratio_over_alias_only": common.figure(s["ratio"], "x", 2)}
    out["this_over_base_p50"] = common.figure([t / b for t, b in zip(systems["this"]["p50"], systems["base"]["p50"], strict=True)],
                                              "x", 2)
    return out


PARTS = ("reconcile", "frozen", "promotion")


def run(folder: Path, runs: int = 3, base_commit: str = "8e21580", parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    if "reconcile" in parts:
        print("reconcile of a half-done promotion", flush=True)
        result["reconcile_in_process"] = _half_done_promotions(folder, runs)
        result["reconcile_after_restart"] = _after_restart(folder, runs)
        print(f"  in-process {result['reconcile_in_process']['median']} ms; after restart "
              f"{result['reconcile_after_restart']['restart_to_recovered']['median']} s", flush=True)
    if "frozen" in parts:
        print("health on a frozen PostgreSQL", flush=True)
        result["frozen_postgres_health"] = _frozen_postgres(runs)
        print(f"  {result['frozen_postgres_health']}", flush=True)
    if "promotion" in parts:
        print("promotion p50, base commit and this", flush=True)
        result["promotion"] = _promotion_p50(folder, runs, base_commit)
        print(f"  {result['promotion']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resilience", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--base-commit", default="8e21580", help="the registry to compare promotion p50 with")
    parser.add_argument("--parts", default=",".join(PARTS), help="a subset re-measures only those figures")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    tmp = Path(tempfile.mkdtemp(prefix="aqimodels-bench-resilience-"))
    try:
        t0 = time.perf_counter()
        res = run(tmp, args.runs, args.base_commit, parts)
        kept = json.loads((common.RESULTS / "resilience.json").read_text()) if set(parts) != set(PARTS) else {}
        kept = {k: v for k, v in kept.items() if k not in ("name", "machine")}
        print(f"wrote {common.write_result('resilience', {**kept, **res, 'section_seconds': time.perf_counter() - t0})}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
