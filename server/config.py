"""Configuration of the registry server, read once from the environment in ``main()``.

Nothing below ``main()`` reads ``os.environ``: the frozen :class:`ServerConfig` is passed down,
and tests construct it directly.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from aqimodels.client.domain import MODEL_TYPE_NAMES
from aqimodels.process.settings import (  # the parsing the worker shares, under this module's own names
    DEFAULT_EXPERIMENT,
    DEFAULT_TRACKING_URI,
    absolute_sqlite_uri,
    check_artifact_location,
    check_database_url,
    check_exposure,
    check_host,
    check_tracking_uri,
    experiment_from_env,
    metrics_port_from_env,
    security_from_env,
)
from aqimodels.process.settings import ConfigError as ConfigError  # raised by everything here
from aqimodels.process.settings import parse_bool as _bool
from aqimodels.process.settings import parse_float as _float
from aqimodels.process.settings import parse_int as _int
from aqimodels.process.settings import pem_file as _pem
from aqimodels.process.settings import shown as _shown
from aqimodels.process.settings import uri_scheme as _scheme
from aqimodels.server.dbtimeouts import DbTimeouts

LOCAL_WORKER = "local"
NO_WORKERS = "none"


_METRIC = re.compile(r"^[A-Za-z0-9_.\-/]{1,250}$")
_DATASET_SCHEMES = ("synthetic", "beijing", "file")
_SYNTHETIC_KEYS = ("stations", "days", "seed")


def check_worker_target(target: str, name: str = "AQIMODELS_WORKERS") -> str:
    """``local``, ``host:port``, ``[v6]:port`` or ``dns:///host:port``."""
    if target == LOCAL_WORKER:
        return target
    rest = target.removeprefix("dns:///")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: {_shown(target)} is not a worker target; use host:port, dns:///name:port, "
                          "local or none")
    check_host(host, name)
    return target


def check_metric_name(metric: str, name: str) -> str:
    if not _METRIC.match(metric):
        raise ConfigError(f"{name}={_shown(metric)} is not a metric name (letters, digits, _ . - /), e.g. rmse")
    return metric


def check_dataset_spec(spec: str, name: str) -> str:
    """The syntax of a dataset spec (the worker checks that its files exist)."""
    if not spec:
        return spec
    scheme = _scheme(spec)
    if scheme and scheme not in _DATASET_SCHEMES and not os.path.exists(spec):
        raise ConfigError(f"{name}={_shown(spec)} has the unknown scheme {scheme!r}; use "
                          "synthetic[:stations=6,days=90,seed=7], beijing:<folder>, file:<path> or a path")
    if scheme == "synthetic":
        for part in filter(None, (p.strip() for p in spec.partition(":")[2].split(","))):
            key, eq, value = (x.strip() for x in part.partition("="))
            if not eq or key not in _SYNTHETIC_KEYS or not re.fullmatch(r"-?[0-9]{1,10}", value):
                raise ConfigError(f"{name}: {_shown(part)} is not a synthetic dataset parameter; use "
                                  "stations=N, days=N and seed=N, e.g. synthetic:stations=6,days=90")
    elif scheme in ("beijing", "file") and not spec.partition(":")[2].strip():
        raise ConfigError(f"{name}={_shown(spec)} names no folder or file after {scheme}:")
    return spec


def _token(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if value and not re.fullmatch(r"[\x21-\x7e]{1,4096}", value):
        raise ConfigError(f"{name} holds spaces, control or non-ASCII characters; a bearer token is printable ASCII")
    return value


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
    # monitoring and automation
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
    # Prometheus endpoint: None = off; 0 = an ephemeral port (tests). AQIMODELS_METRICS_PORT=0 is off.
    metrics_port: int | None = None
    # Durable jobs: a replica's lease of its jobs, renewed every third of it; another
    # replica takes a job over once its lease has expired (owner killed or host lost).
    job_lease_seconds: float = 15.0
    # bounded waits and failure-safe changes (see resilience_from_env)
    db_connect_timeout_seconds: float = 5.0
    db_statement_timeout_seconds: float = 30.0
    db_lock_timeout_seconds: float = 10.0
    db_start_timeout_seconds: float = 30.0  # start-up waits this long for its databases, then exits 1
    db_pool_size: int = 10  # our PostgreSQL pool (plus twice as many overflow); MLflow's: MLFLOW_SQLALCHEMYSTORE_POOL_SIZE
    health_timeout_seconds: float = 0.0  # 0: half the health interval, at most 1 s
    mlflow_http_timeout_seconds: float = 10.0
    mlflow_http_max_retries: int = 2
    reconcile_after_seconds: float = 30.0
    fault_point: str = ""  # tests only: "<action>:<write index>" makes the process SIGKILL itself there
    # webhooks (see webhooks_from_env and server/webhook_delivery.py)
    webhook_retry_seconds: float = 3600.0
    webhook_backoff_seconds: float = 1.0
    webhook_backoff_max_seconds: float = 60.0
    webhook_timeout_seconds: float = 10.0
    webhook_lease_seconds: float = 30.0
    webhook_poll_seconds: float = 0.5
    webhook_log_retention_days: float = 7.0
    # two-person approval of production promotions (server/approvals.py): models named ("*": all)
    approval_models: tuple[str, ...] = ()
    approval_expiry_seconds: float = 7 * 24 * 3600.0

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
        tracking = check_tracking_uri(absolute_sqlite_uri(env.get("MLFLOW_TRACKING_URI", "").strip()
                                                          or DEFAULT_TRACKING_URI))
        workers_raw = env.get("AQIMODELS_WORKERS")
        if workers_raw is None or workers_raw.strip() == "":
            workers: tuple[str, ...] = (LOCAL_WORKER,)
        elif workers_raw.strip().lower() == NO_WORKERS:
            workers = ()
        else:
            workers = tuple(check_worker_target(w.strip()) for w in workers_raw.split(",") if w.strip())
            if not workers:
                raise ConfigError(f"AQIMODELS_WORKERS={_shown(workers_raw)} lists no worker target; use "
                                  "host:port,..., dns:///name:port, local or none")
        level = env.get("AQIMODELS_LOG_LEVEL", "info").strip().lower()
        if level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"AQIMODELS_LOG_LEVEL must be debug, info, warning or error, got {level!r}")
        log_format = env.get("AQIMODELS_LOG_FORMAT", "").strip().lower()
        if log_format not in ("", "json", "console"):
            raise ConfigError(f"AQIMODELS_LOG_FORMAT must be json or console, got {log_format!r}")
        return cls(
            tracking_uri=tracking,
            database_url=check_database_url(absolute_sqlite_uri(env.get("AQIMODELS_DATABASE_URL", "").strip())),
            host=check_host(env.get("AQIMODELS_HOST", "").strip() or "127.0.0.1", "AQIMODELS_HOST"),
            port=_int(env, "AQIMODELS_PORT", 50051, 0, 65535),
            experiment_name=experiment_from_env(env),
            auto_promotion=_bool(env, "MLFLOW_AUTO_PROMOTION", False),
            promotion_metric=check_metric_name(env.get("AQIMODELS_PROMOTION_METRIC", "").strip() or "rmse",
                                               "AQIMODELS_PROMOTION_METRIC"),
            promotion_margin=_float(env, "AQIMODELS_PROMOTION_MARGIN", 0.0),
            workers=workers,
            max_workers=_int(env, "AQIMODELS_MAX_WORKERS", 64, 4, 10_000),
            log_json=(log_format == "json") if log_format else not sys.stderr.isatty(),
            log_level=level,
            cache_ttl_seconds=_float(env, "AQIMODELS_CACHE_TTL_SECONDS", 2.0),
            shutdown_grace_seconds=_float(env, "AQIMODELS_SHUTDOWN_GRACE_SECONDS", 10.0),
            artifact_location=check_artifact_location(env.get("AQIMODELS_ARTIFACT_LOCATION", "").strip()),
            metrics_port=metrics_port_from_env(env, "AQIMODELS_METRICS_PORT", "AQIMODELS_PORT", 50051),
            job_lease_seconds=_lease_seconds(env),
            **security_from_env(env),
            worker_token=_token(env, "AQIMODELS_WORKER_TOKEN"),
            **worker_tls_from_env(env),
            **monitoring_from_env(env),
            **resilience_from_env(env),
            **webhooks_from_env(env),
            **approvals_from_env(env),
        ).checked()

    def checked(self) -> ServerConfig:
        """Refuses an unparseable listening address, and one off loopback without a token file."""
        check_host(self.host, "AQIMODELS_HOST")
        check_exposure(self.host, self.tokens_file, "AQIMODELS_HOST")
        return self


def _lease_seconds(env: Mapping[str, str]) -> float:
    value = _float(env, "AQIMODELS_JOB_LEASE_SECONDS", 15.0, 1.0)
    if value > 300:
        raise ConfigError(f"AQIMODELS_JOB_LEASE_SECONDS must be between 1 and 300, got {value}")
    return value


class WorkerTls(TypedDict):
    worker_ca_cert: str
    worker_client_cert: str
    worker_client_key: str


def worker_tls_from_env(env: Mapping[str, str]) -> WorkerTls:
    """How the registry reaches its workers over TLS: a CA bundle, and a client pair for mutual TLS."""
    values = WorkerTls(worker_ca_cert=_pem(env, "AQIMODELS_WORKER_CA_CERT", "CERTIFICATE"),
                       worker_client_cert=_pem(env, "AQIMODELS_WORKER_CLIENT_CERT", "CERTIFICATE"),
                       worker_client_key=_pem(env, "AQIMODELS_WORKER_CLIENT_KEY", "PRIVATE KEY"))
    if bool(values["worker_client_cert"]) != bool(values["worker_client_key"]):
        raise ConfigError("AQIMODELS_WORKER_CLIENT_CERT and AQIMODELS_WORKER_CLIENT_KEY must be set together")
    return values


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
        retrain_dataset=check_dataset_spec(env.get("AQIMODELS_RETRAIN_DATASET", "").strip(),
                                           "AQIMODELS_RETRAIN_DATASET"),
        retention_keep_last=keep_last,
        retention_older_than_days=older_than,
    )


class ResilienceSettings(TypedDict):
    db_connect_timeout_seconds: float
    db_statement_timeout_seconds: float
    db_lock_timeout_seconds: float
    db_pool_size: int
    db_start_timeout_seconds: float
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
        db_pool_size=_int(env, "AQIMODELS_DB_POOL_SIZE", 10, 1, 1000),
        db_start_timeout_seconds=positive("AQIMODELS_DB_START_TIMEOUT_SECONDS", 30.0),
        health_interval_seconds=positive("AQIMODELS_HEALTH_INTERVAL_SECONDS", 2.0),
        health_timeout_seconds=_float(env, "AQIMODELS_HEALTH_TIMEOUT_SECONDS", 0.0),
        mlflow_http_timeout_seconds=positive("AQIMODELS_MLFLOW_HTTP_TIMEOUT_SECONDS", 10.0),
        mlflow_http_max_retries=_int(env, "AQIMODELS_MLFLOW_HTTP_MAX_RETRIES", 2, 0, 10),
        reconcile_after_seconds=positive("AQIMODELS_RECONCILE_AFTER_SECONDS", 30.0),
        fault_point=fault,
    )


class WebhookSettings(TypedDict):
    webhook_retry_seconds: float
    webhook_backoff_seconds: float
    webhook_backoff_max_seconds: float
    webhook_timeout_seconds: float
    webhook_lease_seconds: float
    webhook_poll_seconds: float
    webhook_log_retention_days: float


def webhooks_from_env(env: Mapping[str, str]) -> WebhookSettings:
    """Webhook delivery: retries, timeouts, the lease of a webhook and the delivery log's retention."""
    def positive(name: str, default: float) -> float:
        value = _float(env, name, default)
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
        return value

    backoff = positive("AQIMODELS_WEBHOOK_BACKOFF_SECONDS", 1.0)
    backoff_max = positive("AQIMODELS_WEBHOOK_BACKOFF_MAX_SECONDS", 60.0)
    if backoff_max < backoff:
        raise ConfigError(f"AQIMODELS_WEBHOOK_BACKOFF_MAX_SECONDS ({backoff_max:g}) must be at least "
                          f"AQIMODELS_WEBHOOK_BACKOFF_SECONDS ({backoff:g})")
    timeout = positive("AQIMODELS_WEBHOOK_TIMEOUT_SECONDS", 10.0)
    if timeout > 300:
        raise ConfigError(f"AQIMODELS_WEBHOOK_TIMEOUT_SECONDS must be at most 300, got {timeout:g}")
    lease = positive("AQIMODELS_WEBHOOK_LEASE_SECONDS", 30.0)
    if lease <= 2 * timeout:
        raise ConfigError(f"AQIMODELS_WEBHOOK_LEASE_SECONDS ({lease:g}) must be more than twice "
                          f"AQIMODELS_WEBHOOK_TIMEOUT_SECONDS ({timeout:g}): an attempt must end within the lease")
    poll = positive("AQIMODELS_WEBHOOK_POLL_SECONDS", 0.5)
    if poll > 60:
        raise ConfigError(f"AQIMODELS_WEBHOOK_POLL_SECONDS must be at most 60, got {poll:g}")
    return WebhookSettings(
        webhook_retry_seconds=positive("AQIMODELS_WEBHOOK_RETRY_SECONDS", 3600.0),
        webhook_backoff_seconds=backoff,
        webhook_backoff_max_seconds=backoff_max,
        webhook_timeout_seconds=timeout,
        webhook_lease_seconds=lease,
        webhook_poll_seconds=poll,
        webhook_log_retention_days=positive("AQIMODELS_WEBHOOK_LOG_RETENTION_DAYS", 7.0),
    )
class ApprovalSettings(TypedDict):
    approval_models: tuple[str, ...]
    approval_expiry_seconds: float


_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-/:@+]{1,256}$")


def approvals_from_env(env: Mapping[str, str]) -> ApprovalSettings:
    """The models whose production promotions need a second admin, and how long a request waits."""
    raw = env.get("AQIMODELS_APPROVAL_MODELS", "")
    models: tuple[str, ...] = ()
    if raw.strip():
        parts = [m.strip() for m in raw.split(",")]
        bad = [m for m in parts if m != "*" and not _MODEL_NAME.match(m)]
        if bad:
            raise ConfigError(f"AQIMODELS_APPROVAL_MODELS={_shown(raw)}: {_shown(bad[0])} is not a model name; "
                              "use comma-separated model names (letters, digits, _ . - / : @ +) or * for all")
        if "*" in parts and len(parts) > 1:
            raise ConfigError(f"AQIMODELS_APPROVAL_MODELS={_shown(raw)} mixes * with model names; * alone "
                              "means every model")
        models = tuple(dict.fromkeys(parts))
    expiry = _float(env, "AQIMODELS_APPROVAL_EXPIRY_SECONDS", 7 * 24 * 3600.0)
    if expiry <= 0:
        raise ConfigError(f"AQIMODELS_APPROVAL_EXPIRY_SECONDS must be positive, got {expiry}")
    return ApprovalSettings(approval_models=models, approval_expiry_seconds=expiry)
