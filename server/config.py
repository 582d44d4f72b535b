"""Configuration of the registry server, read once from the environment in ``main()``.

Nothing below ``main()`` reads ``os.environ``: the frozen :class:`ServerConfig` is passed down,
and tests construct it directly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aqimodels.client.errors import InvalidArgumentError

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "aqi-predictor"
LOCAL_WORKER = "local"
NO_WORKERS = "none"


class ConfigError(InvalidArgumentError):
    """A bad environment value; the message names the variable."""


def _int(env: Mapping[str, str], name: str, default: int, lo: int = 0, hi: int = 1 << 31) -> int:
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


def _float(env: Mapping[str, str], name: str, default: float, lo: float = 0.0) -> float:
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


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {env.get(name)!r}")


def absolute_sqlite_uri(uri: str, base: Path | None = None) -> str:
    """Makes a relative ``sqlite:///x.db`` absolute so that processes in other folders agree."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/") or uri == "sqlite:///:memory:":
        return uri
    path = Path(uri[len(prefix):])
    return prefix + str(((base or Path.cwd()) / path).resolve())


def sqlite_path(uri: str) -> Path | None:
    """The file of an absolute ``sqlite:///`` URI, else None."""
    if uri.startswith("sqlite:////"):
        return Path(uri[len("sqlite:///"):])
    return None


@dataclass(frozen=True)
class ServerConfig:
    """Everything the registry process needs to know.

    Attributes:
        tracking_uri: MLflow tracking (and registry) store.
        database_url: where aqimodels keeps its own tables (audit, jobs); by default the same
            database as MLflow when that is a database, else a SQLite file beside ``mlruns``.
        workers: training worker targets; ``("local",)`` starts one worker subprocess;
            empty means none (retrains queue and say why).
        cache_ttl_seconds: longest time a read may lag a change made by another writer.
    """

    tracking_uri: str = DEFAULT_TRACKING_URI
    database_url: str = ""
    host: str = "127.0.0.1"
    port: int = 50051
    experiment_name: str = DEFAULT_EXPERIMENT
    auto_promotion: bool = False
    promotion_metric: str = "rmse"
    promotion_margin: float = 0.0
    workers: tuple[str, ...] = (LOCAL_WORKER,)
    max_workers: int = 64
    log_json: bool = field(default_factory=lambda: not sys.stderr.isatty())
    log_level: str = "info"
    cache_ttl_seconds: float = 2.0
    health_interval_seconds: float = 2.0
    shutdown_grace_seconds: float = 10.0
    artifact_location: str = ""

    @property
    def bind(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def own_database_url(self) -> str:
        """The SQLAlchemy URL of aqimodels' own tables."""
        if self.database_url:
            return self.database_url
        if self.tracking_uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
            return self.tracking_uri
        return absolute_sqlite_uri("sqlite:///mlruns/aqimodels.db")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServerConfig:
        """Reads the configuration; a bad value raises ConfigError naming the variable."""
        tracking = absolute_sqlite_uri(env.get("MLFLOW_TRACKING_URI", "").strip() or DEFAULT_TRACKING_URI)
        workers_raw = env.get("AQIMODELS_WORKERS")
        if workers_raw is None or workers_raw.strip() == "":
            workers: tuple[str, ...] = (LOCAL_WORKER,)
        elif workers_raw.strip().lower() == NO_WORKERS:
            workers = ()
        else:
            workers = tuple(w.strip() for w in workers_raw.split(",") if w.strip())
        level = env.get("AQIMODELS_LOG_LEVEL", "info").strip().lower()
        if level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"AQIMODELS_LOG_LEVEL must be debug, info, warning or error, got {level!r}")
        log_format = env.get("AQIMODELS_LOG_FORMAT", "").strip().lower()
        if log_format not in ("", "json", "console"):
            raise ConfigError(f"AQIMODELS_LOG_FORMAT must be json or console, got {log_format!r}")
        return cls(
            tracking_uri=tracking,
            database_url=absolute_sqlite_uri(env.get("AQIMODELS_DATABASE_URL", "").strip()),
            host=env.get("AQIMODELS_HOST", "").strip() or "127.0.0.1",
            port=_int(env, "AQIMODELS_PORT", 50051, 0, 65535),
            experiment_name=env.get("MLFLOW_EXPERIMENT_NAME", "").strip() or DEFAULT_EXPERIMENT,
            auto_promotion=_bool(env, "MLFLOW_AUTO_PROMOTION", False),
            promotion_metric=env.get("AQIMODELS_PROMOTION_METRIC", "").strip() or "rmse",
            promotion_margin=_float(env, "AQIMODELS_PROMOTION_MARGIN", 0.0),
            workers=workers,
            max_workers=_int(env, "AQIMODELS_MAX_WORKERS", 64, 4, 10_000),
            log_json=(log_format == "json") if log_format else not sys.stderr.isatty(),
            log_level=level,
            cache_ttl_seconds=_float(env, "AQIMODELS_CACHE_TTL_SECONDS", 2.0),
            shutdown_grace_seconds=_float(env, "AQIMODELS_SHUTDOWN_GRACE_SECONDS", 10.0),
            artifact_location=env.get("AQIMODELS_ARTIFACT_LOCATION", "").strip(),
        )
