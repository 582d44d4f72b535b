"""Section 5: CLI start-up. ``aqimodels status`` against a live registry (4 models x 20 versions),
piped, against the floor any Python gRPC client of this API pays: a process that imports grpc
and the generated registry module. Interleaved pairs in one run; the figure is the ratio.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench import common, data

FLOOR = "import grpc; from aqimodels.api.registry.v1 import registry_pb2_grpc"


def _wall(cmd: list[str]) -> float:
    """Wall seconds of one run. Waited on with a blocking wait and a watchdog: a wait with a
    timeout polls (subprocess sleeps 0.5, 1, 2 ... 50 ms between looks), which rounded every
    figure up to the next of 113.5, 163.5, 213.5 ms and so on."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=common.base_env(AQIMODELS_TOKEN="", COLUMNS="120"))
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        code = proc.wait()
    finally:
        watchdog.cancel()
    elapsed = time.perf_counter() - t0
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)
    return elapsed


def run(folder: Path, runs: int = 7) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    # The installed state (`make bytecode`): with PYTHONDONTWRITEBYTECODE set, a module edited since
    # would be compiled again on every start (~20 ms of render and cli), which no user pays.
    subprocess.run([str(common.BIN / "python"), "-m", "compileall", "-q", str(common.ROOT / "build")], check=True,
                   stdout=subprocess.DEVNULL, timeout=300)
    db = folder / "cli.db"
    data.build_sql(db, 20, folder)
    proc, target, _ = common.start_registry(f"sqlite:///{db}", folder)
    try:
        status = [str(common.BIN / "aqimodels"), "--target", target, "status"]
        floor = [str(common.BIN / "python"), "-c", FLOOR]
        _wall(status), _wall(floor)  # warm the page cache and the registry's read model
        cli: list[float] = []
        base: list[float] = []
        for _ in range(max(runs, 7)):
            cli.append(_wall(status))
            base.append(_wall(floor))
        ratios = [c / b for c, b in zip(cli, base, strict=True)]
        print(f"  cli status {statistics.median(cli):.3f} s, import floor {statistics.median(base):.3f} s, "
              f"ratio {statistics.median(ratios):.2f}x", flush=True)
        return {"status_seconds": common.figure(cli, "s"), "import_floor_seconds": common.figure(base, "s"),
                "ratio_status_over_import_floor": common.figure(ratios, "x", 2)}
    finally:
        common.stop(proc)
