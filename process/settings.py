"""Environment parsing that the registry and the worker share: numbers, flags, hosts, URIs, files.

Each helper reads one variable and raises :class:`ConfigError` naming it when the value is bad;
the processes' own settings (``server/config.py``, ``training/main.py``) are built from these.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

from aqimodels.client.addresses import is_loopback
from aqimodels.client.errors import InvalidArgumentError, bound, quote

__all__ = ["DEFAULT_EXPERIMENT", "DEFAULT_TRACKING_URI", "ConfigError", "SecuritySettings", "absolute_sqlite_uri",
           "check_artifact_location", "check_database_url", "check_exposure", "check_host", "check_tracking_uri",
           "experiment_from_env", "is_loopback", "local_folder_problem", "metrics_port_from_env", "parse_bool",
           "parse_float", "parse_int", "pem_file", "readable_file", "security_from_env", "shown", "toml_file",
           "uri_scheme"]


DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "aqi-predictor"


class ConfigError(InvalidArgumentError):
    """A bad environment value; the message names the variable."""


def parse_int(env: Mapping[str, str], name: str, default: int, lo: int = 0, hi: int = 1 << 31) -> int:
    raw = env.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def parse_float(env: Mapping[str, str], name: str, default: float, lo: float = 0.0) -> float:
    raw = env.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < lo:
        raise ConfigError(f"{name} must be at least {lo}, got {value}")
    return value


def parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {env.get(name)!r}")


# Schemes MLflow's tracking store takes (a plain path is a file store).
_TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "file", "http", "https", "databricks")
# Schemes of MLflow artifact stores (a plain path is a local folder).
_ARTIFACT_SCHEMES = ("file", "s3", "gs", "wasbs", "abfss", "hdfs", "viewfs", "ftp", "sftp", "http", "https",
                     "mlflow-artifacts", "dbfs", "runs", "models", "oci")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$")


def shown(value: str) -> str:
    return quote(value, 80)


def uri_scheme(uri: str) -> str:
    """The scheme of ``uri`` ("" for a plain path); ``postgresql+psycopg`` gives ``postgresql``."""
    head, sep, _ = uri.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", head) or len(head) == 1:
        return ""  # a plain path (or a Windows drive letter)
    return head.lower().split("+", 1)[0]


def check_tracking_uri(uri: str, name: str = "MLFLOW_TRACKING_URI") -> str:
    scheme = uri_scheme(uri)
    if scheme and scheme not in _TRACKING_SCHEMES:
        raise ConfigError(f"{name}={shown(uri)} has the unknown scheme {scheme!r}; use sqlite:///path.db, "
                          "postgresql+psycopg://user@host/db, a file path or an http(s) tracking server")
    if scheme in _TRACKING_SCHEMES[:4]:
        check_database_url(uri, name)
    return uri


def check_database_url(url: str, name: str = "AQIMODELS_DATABASE_URL") -> str:
    """A SQLAlchemy URL whose dialect and driver are installed."""
    if not url:
        return url
    from sqlalchemy.engine import make_url

    try:
        make_url(url).get_dialect()
    except Exception as exc:  # noqa: BLE001 - ArgumentError, NoSuchModuleError, a driver that fails to import
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{name}={shown(url)} is not a usable database URL ({bound(first, 120)}); "
                          "use sqlite:///path.db or postgresql+psycopg://user@host/db") from None
    return url


def check_host(host: str, name: str) -> str:
    """An IP address or a host name."""
    bare = host.removeprefix("[").removesuffix("]") if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
        return host
    except ValueError:
        pass
    if not _HOSTNAME.match(bare):
        raise ConfigError(f"{name}={shown(host)} is neither an IP address nor a host name")
    return host


def check_artifact_location(location: str, name: str = "AQIMODELS_ARTIFACT_LOCATION") -> str:
    """A known artifact-store scheme; a local folder must be writable (created when missing)."""
    if not location:
        return location
    scheme = uri_scheme(location)
    if scheme and scheme not in _ARTIFACT_SCHEMES:
        raise ConfigError(f"{name}={shown(location)} has the unknown scheme {scheme!r}; use a folder, "
                          "file:///folder, s3://bucket/path, gs://..., or mlflow-artifacts:/...")
    if scheme in ("", "file"):
        problem = local_folder_problem(location)
        if problem:
            raise ConfigError(f"{name}={shown(location)} {problem}")
    return location


def local_folder_problem(location: str) -> str:
    """Why a local artifact folder (path or file: URI) cannot be written, or "" when it can."""
    from urllib.parse import unquote, urlparse

    path = unquote(urlparse(location).path) if location.startswith("file:") else location
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"is not writable: {exc.strerror or exc}"
    return ""


def absolute_sqlite_uri(uri: str, base: Path | None = None) -> str:
    """Makes a relative ``sqlite:///x.db`` absolute so that processes in other folders agree."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/") or uri == "sqlite:///:memory:":
        return uri
    path = Path(uri[len(prefix):])
    return prefix + str(((base or Path.cwd()) / path).resolve())


def check_exposure(host: str, tokens_file: str, variable: str) -> None:
    if not tokens_file and not is_loopback(host):
        raise ConfigError(
            f"{variable}={host} listens beyond loopback but AQIMODELS_TOKENS_FILE is not set: refusing to run "
            "open. Create a token with `aqimodels token create NAME --role admin`, append the printed entry "
            "to a TOML file and point AQIMODELS_TOKENS_FILE at it")


def metrics_port_from_env(env: Mapping[str, str], name: str, grpc_name: str, grpc_default: int) -> int | None:
    """The Prometheus port in ``name`` (unset or 0: no endpoint); it must differ from the gRPC port."""
    port = parse_int(env, name, 0, 0, 65535)
    if port and port == parse_int(env, grpc_name, grpc_default, 0, 65535):
        raise ConfigError(f"{name}={port} is also the gRPC port ({grpc_name}); choose another port")
    return port or None


def readable_file(env: Mapping[str, str], name: str) -> str:
    path = env.get(name, "").strip()
    if path and not Path(path).is_file():
        raise ConfigError(f"{name}={shown(path)} is not a readable file")
    return path


def pem_file(env: Mapping[str, str], name: str, kind: str) -> str:
    """A readable PEM file holding ``kind`` ("CERTIFICATE" or "PRIVATE KEY"); grpc itself only says
    "Failed to bind" (server) or fails each call (channel) on anything else."""
    path = readable_file(env, name)
    if path:
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{name}={shown(path)} cannot be read: {exc.strerror or exc}") from None
        if not re.search(rb"-----BEGIN [A-Z ]*" + kind.encode() + rb"-----", text):
            raise ConfigError(f"{name}={shown(path)} is not a PEM {kind.lower()} (no '-----BEGIN ... {kind}-----')")
    return path


def toml_file(env: Mapping[str, str], name: str) -> str:
    """A readable TOML file (the entries are checked when the token store loads)."""
    import tomllib

    path = readable_file(env, name)
    if path:
        try:
            tomllib.loads(Path(path).read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"{name}: token file {shown(path)} is not valid TOML: "
                              f"{bound(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 160)}") from None
    return path


def experiment_from_env(env: Mapping[str, str]) -> str:
    name = env.get("MLFLOW_EXPERIMENT_NAME", "").strip() or DEFAULT_EXPERIMENT
    if len(name) > 256 or re.search(r"[\x00-\x1f\x7f]", name):
        raise ConfigError("MLFLOW_EXPERIMENT_NAME must be at most 256 printable characters")
    return name


class SecuritySettings(TypedDict):
    tokens_file: str
    tls_cert: str
    tls_key: str
    tls_client_ca: str


def security_from_env(env: Mapping[str, str]) -> SecuritySettings:
    """Token file and TLS files, shared by the registry and the worker."""
    values: SecuritySettings = {"tokens_file": toml_file(env, "AQIMODELS_TOKENS_FILE"),
                                "tls_cert": pem_file(env, "AQIMODELS_TLS_CERT", "CERTIFICATE"),
                                "tls_key": pem_file(env, "AQIMODELS_TLS_KEY", "PRIVATE KEY"),
                                "tls_client_ca": pem_file(env, "AQIMODELS_TLS_CLIENT_CA", "CERTIFICATE")}
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("AQIMODELS_TLS_CERT and AQIMODELS_TLS_KEY must be set together")
    if values["tls_client_ca"] and not values["tls_cert"]:
        raise ConfigError("AQIMODELS_TLS_CLIENT_CA (mutual TLS) needs AQIMODELS_TLS_CERT and AQIMODELS_TLS_KEY")
    return values
