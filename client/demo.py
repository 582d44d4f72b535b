"""``make demo``: a registry with a local worker in a scratch folder, driven through the CLI.

Starts ``aqimodels serve`` on a free port over a fresh SQLite MLflow store, waits until it is
SERVING, then runs visibly: ``retrain`` (all four models, with progress), ``compare`` and
``promote --best`` for each model, and ``status``. Stops the server with SIGTERM at the end. Any
failed step stops the demo with a non-zero exit.

Usage::

    python -m aqimodels.client.demo [--dir DIR] [--epochs N] [--data SPEC]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aqimodels.client.client import RegistryClient
from aqimodels.client.domain import MODEL_TYPE_NAMES, registered_model_name
from aqimodels.client.errors import AqiModelsError

MODELS = tuple(registered_model_name(t) for t in MODEL_TYPE_NAMES)


class DemoError(Exception):
    """A demo step failed."""


def _free_port() -> int:
    # The server binds it a moment later; a race here only makes the demo retry by hand.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _aqimodels() -> list[str]:
    script = Path(sys.executable).parent / "aqimodels"
    return [str(script)] if script.exists() else [sys.executable, "-m", "aqimodels.client.cli"]


def _banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _run(args: list[str], env: dict[str, str]) -> None:
    print(f"\n$ aqimodels {shlex.join(args)}", flush=True)
    done = subprocess.run([*_aqimodels(), *args], env=env, check=False)
    if done.returncode != 0:
        raise DemoError(f"`aqimodels {shlex.join(args)}` exited with {done.returncode}")


def _wait_serving(target: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with RegistryClient(target) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise DemoError(f"the registry exited with {server.returncode} before it was ready")
            try:
                last = client.health(timeout=2.0)
                if last == "SERVING":
                    return
            except AqiModelsError as exc:
                last = f"{exc.code.name}: {exc.message}"
            time.sleep(0.5)
    raise DemoError(f"the registry at {target} was not SERVING after {timeout:.0f} s ({last})")


def _stop(server: subprocess.Popen[bytes], grace: float = 30.0) -> int:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"the registry did not stop within {grace:.0f} s of SIGTERM; killing it", file=sys.stderr)
            server.kill()
            server.wait()
    return int(server.returncode)


def run(workdir: Path, epochs: int = 0, data: str = "", ready_timeout: float = 120.0) -> None:
    """Runs the demo in workdir (the MLflow store and artifacts land there)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    target = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AQIMODELS_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{workdir.resolve()}/mlflow.db", MLFLOW_DISABLE_TELEMETRY="true",
               AQIMODELS_TARGET=target, COLUMNS=env.get("COLUMNS", "140"))
    _banner(f"starting the registry on {target} (MLflow store in {workdir})")
    log_path = workdir / "server.log"
    with open(log_path, "ab") as log:
        # cwd=workdir: MLflow's default artifact root is relative to the working directory.
        server = subprocess.Popen([*_aqimodels(), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_serving(target, server, ready_timeout)
        print(f"registry is SERVING (its log: {log_path})", flush=True)

        _banner("train all four models on the synthetic data set")
        retrain = ["retrain"]
        if data:
            retrain += ["--data", data]
        if epochs:
            retrain += ["--epochs", str(epochs)]
        _run(retrain, env)

        _banner("compare the versions of each model")
        for name in MODELS:
            _run(["compare", name], env)

        _banner("promote the best version of each model to production")
        for name in MODELS:
            _run(["promote", name, "--best", "--reason", "make demo"], env)

        _banner("the registry now")
        _run(["status"], env)
    except BaseException:
        code = _stop(server)
        print(f"\nthe registry stopped (exit {code}); its log is {log_path}", file=sys.stderr)
        raise
    code = _stop(server)
    if code not in (0, -signal.SIGTERM):
        raise DemoError(f"the registry exited with {code} on SIGTERM (see {log_path})")
    _banner(f"done. MLflow store: {workdir}/mlflow.db  (mlflow ui --backend-store-uri "
            f"sqlite:///{workdir.resolve()}/mlflow.db)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aqimodels.client.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None,
                        help="work folder (default: a new temporary folder, kept for inspection)")
    parser.add_argument("--epochs", type=int, default=0, help="maximum epochs/rounds (default: trainer default)")
    parser.add_argument("--data", default="", help="dataset spec (default: synthetic)")
    args = parser.parse_args(argv)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="aqimodels-demo-"))
    try:
        run(workdir, epochs=args.epochs, data=args.data)
    except DemoError as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
