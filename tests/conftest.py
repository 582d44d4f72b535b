"""Shared fixtures: real MLflow stores (SQLite in a temp dir, or a fresh PostgreSQL database) and
real registry servers on ephemeral loopback ports, reached through the real client."""

from __future__ import annotations

import os

# Telemetry is decided once at mlflow's import: set this before anything imports it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import atexit
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from test_faults import ThrowawayPostgres

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _shared_data() -> Path:
    """The Beijing data: $AQIMODELS_BEIJING_DATA, else ../shared beside the checkout, else /work/shared.

    A clean checkout elsewhere (CI clones into a temporary folder) still finds the machine's copy.
    """
    candidates = [Path(p) for p in [os.environ.get("AQIMODELS_BEIJING_DATA", "")] if p]
    candidates += [Path(__file__).resolve().parents[1].parent / "shared" / "data" / "beijing-multisite",
                   Path("/work/shared/data/beijing-multisite")]
    return next((c for c in candidates if c.is_dir()), candidates[0])


SHARED_DATA = _shared_data()


def _must_not_skip() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("AQIMODELS_REQUIRE_POSTGRES"))


def postgres_available() -> str | None:
    """None when the local PostgreSQL answers, else why not."""
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return str(exc).splitlines()[0]


@pytest.fixture(scope="session")
def shared_beijing() -> Path:
    """The shared Beijing data folder; skips cleanly when absent, except in CI."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"the shared Beijing data is missing in CI: {SHARED_DATA}")
        pytest.skip(f"shared Beijing data not found at {SHARED_DATA}")
    return SHARED_DATA


def _migrate(uri: str) -> None:
    """Creates MLflow's and aqimodels' tables in a subprocess (so no connection stays open)."""
    code = ("from mlflow.tracking import MlflowClient; import sys; "
            "MlflowClient(tracking_uri=sys.argv[1]).search_experiments(); "
            "from aqimodels.server.db import Database; d = Database(sys.argv[1]); d.create_tables(); "
            "d.engine.dispose()")
    subprocess.run([sys.executable, "-c", code, uri], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite store, copied for each test (migrations take seconds, a copy milliseconds)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    _migrate(f"sqlite:///{path}")
    return path


_PG_TEMPLATE: list[str] = []


def create_postgres_database() -> str:
    """Creates a fresh, migrated database on the local server and returns its SQLAlchemy URL."""
    import psycopg

    if not _PG_TEMPLATE:
        template = f"aqimodels_tmpl_{uuid.uuid4().hex[:12]}"
        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{template}"')
        _migrate(f"postgresql+psycopg://postgres@127.0.0.1:5432/{template}")
        _PG_TEMPLATE.append(template)
        atexit.register(drop_postgres_database, f"postgresql+psycopg://postgres@127.0.0.1:5432/{template}")
    name = f"aqimodels_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_PG_TEMPLATE[0]}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_postgres_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_or_skip() -> None:
    why = postgres_available()
    if why is not None:
        if _must_not_skip():
            pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required in CI but does not answer: {why}")
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 does not answer: {why}")


@pytest.fixture
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A private PostgreSQL cluster that a fault test may stop and start (the shared one never)."""
    from test_faults import PG_BIN, ThrowawayPostgres

    postgres_or_skip()
    if not (PG_BIN / "initdb").exists() or shutil.which("su") is None:
        pytest.skip("PostgreSQL server binaries are not installed")
    pg = ThrowawayPostgres()
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database (skipped when no server answers, never in CI)."""
    postgres_or_skip()
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path, _sqlite_template: Path) -> Iterator[str]:
    """A fresh MLflow store URI: SQLite file in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        shutil.copy(_sqlite_template, tmp_path / "mlflow.db")
        yield f"sqlite:///{tmp_path}/mlflow.db"
        return
    postgres_or_skip()
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture
def sqlite_uri(tmp_path: Path, _sqlite_template: Path) -> str:
    """A fresh, migrated SQLite store in tmp_path."""
    shutil.copy(_sqlite_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


@dataclass
class Registry:
    """A running registry server and a client connected to it."""

    server: object
    port: int
    tracking_uri: str
    client: object
    store: object

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def seed(self, name: str, metrics_list: list[dict[str, float]], tags: dict[str, str] | None = None) -> list[int]:
        """Registers one version per metrics dict (a finished run with those metrics).

        The versions are written straight to MLflow, as another writer would: the registry would
        see them within its cache bound (test_read_model.py tests that bound). The read model is
        told here instead, so that a test reading right after seeding reads what it seeded.
        """
        versions = [self.store.create_version(name, m, tags) for m in metrics_list]  # type: ignore[attr-defined]
        self.server.service.invalidate(name)  # type: ignore[attr-defined]
        return versions


def realistic_metrics(i: int, seed: int = 0) -> dict[str, float]:
    """Metrics shaped like a real training run's (rmse in µg/m³ and so on), varying with i."""
    import random

    rng = random.Random(seed * 100_003 + i)
    rmse = 18.0 + rng.random() * 12.0
    return {
        "rmse": rmse, "mae": rmse * 0.68, "r2": max(0.0, 0.92 - rmse / 100), "accuracy": 0.5 + rng.random() * 0.3,
        "aqi_accuracy": 0.6 + rng.random() * 0.3, "rmse_h1": rmse * 0.45, "rmse_h6": rmse * 0.9,
        "rmse_h24": rmse * 1.3, "baseline_rmse": 33.0, "training_seconds": 20 + rng.random() * 40,
    }


def start_registry(tracking_uri: str, **overrides: object) -> Registry:
    from aqimodels.client import RegistryClient
    from aqimodels.server.app import create_server
    from aqimodels.server.config import ServerConfig

    jobs_factory = overrides.pop("jobs_factory", None)
    config = replace(ServerConfig(tracking_uri=tracking_uri, workers=(), log_json=True,
                                  health_interval_seconds=0.5, shutdown_grace_seconds=2.0), **overrides)  # type: ignore[arg-type]
    rs = create_server(config, "127.0.0.1:0", jobs_factory=jobs_factory)
    client = RegistryClient(f"127.0.0.1:{rs.port}", timeout=60)
    return Registry(rs, rs.port, tracking_uri, client, rs.service.store)


@pytest.fixture
def registry(store_uri: str) -> Iterator[Registry]:
    """A registry on each backend (SQLite, then PostgreSQL)."""
    reg = start_registry(store_uri)
    try:
        yield reg
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]


@pytest.fixture
def sqlite_registry(sqlite_uri: str) -> Iterator[Registry]:
    """A registry on a SQLite store only (for tests that do not depend on the backend)."""
    reg = start_registry(sqlite_uri)
    try:
        yield reg
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(1)  # type: ignore[attr-defined]


@dataclass
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_certs(folder: Path) -> Certs:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(path: Path, data: bytes) -> str:
        path.write_bytes(data)
        return str(path)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("aqimodels test CA")).issuer_name(name("aqimodels test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    server_cert, server_key = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_cert, client_key = leaf("aqimodels-client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    folder.mkdir(parents=True, exist_ok=True)
    return Certs(write(folder / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
                 write(folder / "server.pem", server_cert), write(folder / "server.key", server_key),
                 write(folder / "client.pem", client_cert), write(folder / "client.key", client_key))


def serve_process(env: dict[str, str], cwd: Path | None = None) -> tuple[subprocess.Popen[str], int]:
    """Starts `aqimodels serve` as a newcomer would (port 0, JSON logs); returns it and its port.

    The port comes from the `registry_started` log line; stderr is drained afterwards so the
    process never blocks on a full pipe.
    """
    import json
    import threading
    import time

    aqimodels = str(Path(sys.executable).with_name("aqimodels"))
    full = {**os.environ, "AQIMODELS_PORT": "0", "AQIMODELS_LOG_FORMAT": "json", **env}
    proc = subprocess.Popen([aqimodels, "serve"], env=full, cwd=cwd, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}")
            continue
        if '"registry_started"' in line:
            port = int(json.loads(line)["address"].rsplit(":", 1)[1])
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
            return proc, port
    proc.kill()
    raise AssertionError("serve did not start within 120 s")


def start_worker(tracking_uri: str, folder: Path, capacity: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    port_file = folder / f"worker-{time.monotonic_ns()}.port"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "AQIMODELS_WORKER_CAPACITY": str(capacity),
           "AQIMODELS_LOG_FORMAT": "json"}
    proc = subprocess.Popen([sys.executable, "-m", "aqimodels.training.main", "--host", "127.0.0.1", "--port", "0",
                             "--port-file", str(port_file)], env=env)
    deadline = time.monotonic() + 120
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start (exit code {proc.poll()})")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def wait_for_worker(reg: Registry, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = reg.client.status().workers  # type: ignore[attr-defined]
        if workers and all(w.healthy for w in workers):
            return
        time.sleep(0.2)
    raise AssertionError("the worker never turned healthy")


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def registry_with_worker(folder: Path, template: Path) -> Iterator[Registry]:
    """A registry on a copy of the template store, with one real worker process, for a module's
    fixture to ``yield from``; both are stopped when the fixture ends."""
    from aqimodels.server.jobs import jobs_factory

    shutil.copy(template, folder / "mlflow.db")
    uri = f"sqlite:///{folder}/mlflow.db"
    worker, target = start_worker(uri, folder)
    reg = start_registry(uri, workers=(target,), jobs_factory=jobs_factory)
    try:
        wait_for_worker(reg)
        yield reg
    finally:
        reg.client.close()  # type: ignore[attr-defined]
        reg.server.stop(2)  # type: ignore[attr-defined]
        stop_worker(worker)
