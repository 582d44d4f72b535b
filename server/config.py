"""Configuration of the registry server, read once from the environment in ``main()``.

Nothing below ``main()`` reads ``os.environ``: the frozen :class:`ServerConfig` is passed down,
and tests construct it directly.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from aqimodels.client.errors import InvalidArgumentError
from aqimodels.server.dbtimeouts import DbTimeouts

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
    tokens_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    worker_token: str = ""
    worker_ca_cert: str = ""
    worker_client_cert: str = ""
    worker_client_key: str = ""
    # monitoring and automation (issue 7)
    degradation_ratio: float = 1.5
    degradation_min_samples: int = 100
    degradation_window_hours: float = 24.0
    retrain_on_degradation: bool = False
    retrain_schedule: str = ""
    retrain_models: tuple[str, ...] = ()
    retrain_dataset: str = ""
    retention_keep_last: int = 0
    retention_older_than_days: float = 0.0
    monitor_poll_seconds: float = 1.0
    # Prometheus endpoint (issue 6): None = off; 0 = an ephemeral port (tests). AQIMODELS_METRICS_PORT=0 is off.
    metrics_port: int | None = None
    # Durable jobs: a replica's lease of its jobs, renewed every third of it; another
    # replica takes a job over once its lease has expired (owner killed or host lost).
    job_lease_seconds: float = 15.0
    # bounded waits and failure-safe changes (see resilience_from_env)
    db_connect_timeout_seconds: float = 5.0
    db_statement_timeout_seconds: float = 30.0
    db_lock_timeout_seconds: float = 10.0
    health_timeout_seconds: float = 0.0  # 0: half the health interval, at most 1 s
    mlflow_http_timeout_seconds: float = 10.0
    mlflow_http_max_retries: int = 2
    reconcile_after_seconds: float = 30.0
    fault_point: str = ""  # tests only: "<action>:<write index>" makes the process SIGKILL itself there

    @property
    def db_timeouts(self) -> DbTimeouts:
        return DbTimeouts(self.db_connect_timeout_seconds, self.db_statement_timeout_seconds,
                          self.db_lock_timeout_seconds)

    @property
    def health_timeout(self) -> float:
        return self.health_timeout_seconds or min(1.0, self.health_interval_seconds / 2)

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
            metrics_port=metrics_port_from_env(env, "AQIMODELS_METRICS_PORT", "AQIMODELS_PORT", 50051),
            job_lease_seconds=_lease_seconds(env),
            **security_from_env(env),
            worker_token=env.get("AQIMODELS_WORKER_TOKEN", "").strip(),
            worker_ca_cert=_file(env, "AQIMODELS_WORKER_CA_CERT"),
            worker_client_cert=_file(env, "AQIMODELS_WORKER_CLIENT_CERT"),
            worker_client_key=_file(env, "AQIMODELS_WORKER_CLIENT_KEY"),
            **monitoring_from_env(env),
            **resilience_from_env(env),
        ).checked()

    def checked(self) -> ServerConfig:
        """Refuses a listening address off loopback without a token file."""
        check_exposure(self.host, self.tokens_file, "AQIMODELS_HOST")
        return self


def _lease_seconds(env: Mapping[str, str]) -> float:
    value = _float(env, "AQIMODELS_JOB_LEASE_SECONDS", 15.0, 1.0)
    if value > 300:
        raise ConfigError(f"AQIMODELS_JOB_LEASE_SECONDS must be between 1 and 300, got {value}")
    return value


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, tokens_file: str, variable: str) -> None:
    if not tokens_file and not is_loopback(host):
        raise ConfigError(
            f"{variable}={host} listens beyond loopback but AQIMODELS_TOKENS_FILE is not set: refusing to run "
            "open. Create a token with `aqimodels token create NAME --role admin`, append the printed entry "
            "to a TOML file and point AQIMODELS_TOKENS_FILE at it")


def metrics_port_from_env(env: Mapping[str, str], name: str, grpc_name: str, grpc_default: int) -> int | None:
    """The Prometheus port in ``name`` (unset or 0: no endpoint); it must differ from the gRPC port."""
    port = _int(env, name, 0, 0, 65535)
    if port and port == _int(env, grpc_name, grpc_default, 0, 65535):
        raise ConfigError(f"{name}={port} is also the gRPC port ({grpc_name}); choose another port")
    return port or None


def _file(env: Mapping[str, str], name: str) -> str:
    path = env.get(name, "").strip()
    if path and not Path(path).is_file():
        raise ConfigError(f"{name}={path} is not a readable file")
    return path


def security_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """Token file and TLS files, shared by the registry and the worker."""
    values = {"tokens_file": _file(env, "AQIMODELS_TOKENS_FILE"), "tls_cert": _file(env, "AQIMODELS_TLS_CERT"),
              "tls_key": _file(env, "AQIMODELS_TLS_KEY"), "tls_client_ca": _file(env, "AQIMODELS_TLS_CLIENT_CA")}
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("AQIMODELS_TLS_CERT and AQIMODELS_TLS_KEY must be set together")
    if values["tls_client_ca"] and not values["tls_cert"]:
        raise ConfigError("AQIMODELS_TLS_CLIENT_CA (mutual TLS) needs AQIMODELS_TLS_CERT and AQIMODELS_TLS_KEY")
    return values


MODEL_TYPE_NAMES = ("xgboost", "lstm", "gnn", "ensemble")


def parse_retention(raw: str, name: str = "AQIMODELS_RETENTION") -> tuple[int, float]:
    """``keep_last=N`` and/or ``older_than_days=D`` (comma separated) -> (N, D); 0 means unset."""
    keep_last, older_than = 0, 0.0
    for part in (p.strip() for p in raw.split(",") if p.strip()):
        key, sep, value = (s.strip() for s in part.partition("="))
        try:
            if not sep:
                raise ValueError
            if key == "keep_last":
                keep_last = int(value)
                if keep_last < 1:
                    raise ValueError
            elif key == "older_than_days":
                older_than = float(value)
                if not 0 < older_than < 100_000:
                    raise ValueError
            else:
                raise ConfigError(f"{name}: unknown key {key!r}; use keep_last=N and/or older_than_days=D")
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not valid; use keep_last=N (N >= 1) and/or "
                              "older_than_days=D (D > 0), e.g. keep_last=5,older_than_days=30") from None
    return keep_last, older_than


class MonitoringSettings(TypedDict):
    degradation_ratio: float
    degradation_min_samples: int
    degradation_window_hours: float
    retrain_on_degradation: bool
    retrain_schedule: str
    retrain_models: tuple[str, ...]
    retrain_dataset: str
    retention_keep_last: int
    retention_older_than_days: float


def monitoring_from_env(env: Mapping[str, str]) -> MonitoringSettings:
    """Degradation, scheduled retraining and retention settings (see README, "Monitoring and automation")."""
    schedule = " ".join(env.get("AQIMODELS_RETRAIN_SCHEDULE", "").split())
    if schedule:
        from croniter import croniter

        if not croniter.is_valid(schedule):
            raise ConfigError(f"AQIMODELS_RETRAIN_SCHEDULE {schedule!r} is not a valid cron expression "
                              "(e.g. '0 3 * * *' for 03:00 UTC every day)")
    models = tuple(m.strip().lower() for m in env.get("AQIMODELS_RETRAIN_MODELS", "").split(",") if m.strip())
    unknown = [m for m in models if m not in MODEL_TYPE_NAMES]
    if unknown:
        raise ConfigError(f"AQIMODELS_RETRAIN_MODELS holds unknown model type(s) {', '.join(unknown)}; "
                          f"use {', '.join(MODEL_TYPE_NAMES)}")
    keep_last, older_than = parse_retention(env.get("AQIMODELS_RETENTION", ""))
    window = _float(env, "AQIMODELS_DEGRADATION_WINDOW_HOURS", 24.0)
    if window <= 0:
        raise ConfigError(f"AQIMODELS_DEGRADATION_WINDOW_HOURS must be positive, got {window}")
    return MonitoringSettings(
        degradation_ratio=_float(env, "AQIMODELS_DEGRADATION_RATIO", 1.5, lo=1.0),
        degradation_min_samples=_int(env, "AQIMODELS_DEGRADATION_MIN_SAMPLES", 100, 1, 1 << 40),
        degradation_window_hours=window,
        retrain_on_degradation=_bool(env, "AQIMODELS_RETRAIN_ON_DEGRADATION", False),
        retrain_schedule=schedule,
        retrain_models=models,
        retrain_dataset=env.get("AQIMODELS_RETRAIN_DATASET", "").strip(),
        retention_keep_last=keep_last,
        retention_older_than_days=older_than,
    )


class ResilienceSettings(TypedDict):
    db_connect_timeout_seconds: float
    db_statement_timeout_seconds: float
    db_lock_timeout_seconds: float
    health_interval_seconds: float
    health_timeout_seconds: float
    mlflow_http_timeout_seconds: float
    mlflow_http_max_retries: int
    reconcile_after_seconds: float
    fault_point: str


def resilience_from_env(env: Mapping[str, str]) -> ResilienceSettings:
    """Database and MLflow timeouts, the health probe and the change reconciler (README, "What survives what")."""
    def positive(name: str, default: float) -> float:
        value = _float(env, name, default)
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
        return value

    fault = env.get("AQIMODELS_FAULT_POINT", "").strip()
    if fault and (fault.count(":") != 1 or not fault.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(f"AQIMODELS_FAULT_POINT must be <action>:<write index>, got {fault!r}")
    return ResilienceSettings(
        db_connect_timeout_seconds=positive("AQIMODELS_DB_CONNECT_TIMEOUT_SECONDS", 5.0),
        db_statement_timeout_seconds=positive("AQIMODELS_DB_STATEMENT_TIMEOUT_SECONDS", 30.0),
        db_lock_timeout_seconds=positive("AQIMODELS_DB_LOCK_TIMEOUT_SECONDS", 10.0),
        health_interval_seconds=positive("AQIMODELS_HEALTH_INTERVAL_SECONDS", 2.0),
        health_timeout_seconds=_float(env, "AQIMODELS_HEALTH_TIMEOUT_SECONDS", 0.0),
        mlflow_http_timeout_seconds=positive("AQIMODELS_MLFLOW_HTTP_TIMEOUT_SECONDS", 10.0),
        mlflow_http_max_retries=_int(env, "AQIMODELS_MLFLOW_HTTP_MAX_RETRIES", 2, 0, 10),
        reconcile_after_seconds=positive("AQIMODELS_RECONCILE_AFTER_SECONDS", 30.0),
        fault_point=fault,
    )
