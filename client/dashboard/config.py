"""The dashboard's configuration: where the registry is, where to listen, TLS and the cookie secret."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aqimodels.client.addresses import is_loopback
from aqimodels.client.client import DEFAULT_TARGET

DEFAULT_PORT = 8080


class DashboardConfigError(ValueError):
    """A bad setting; the message names the option or variable."""


@dataclass(frozen=True)
class DashboardConfig:
    """Settings of one dashboard process.

    Attributes:
        target, token, ca_cert, client_cert, client_key, timeout: the registry connection (the CLI's
            global options). ``token`` runs the shared streams; each browser calls with its own.
        host, port: where to listen (loopback by default, as the registry).
        tls_cert, tls_key: PEM files to serve HTTPS (required off loopback).
        secret: signs the session cookie; a random one per process when empty (sessions then end
            with the process).
        session_hours: how long a login lasts.
    """

    target: str = DEFAULT_TARGET
    token: str | None = None
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    timeout: float = 30.0
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tls_cert: str = ""
    tls_key: str = ""
    secret: str = ""
    session_hours: float = 12.0
    status_interval_seconds: float = 2.0

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **given: object) -> DashboardConfig:
        """The environment's settings (``AQIMODELS_DASHBOARD_*``), overridden by ``given`` (CLI options)."""
        values: dict[str, object] = {}
        host = env.get("AQIMODELS_DASHBOARD_HOST", "").strip()
        if host:
            values["host"] = host
        raw = env.get("AQIMODELS_DASHBOARD_PORT", "").strip()
        if raw:
            if not raw.isdigit() or not 0 <= int(raw) <= 65535:
                raise DashboardConfigError(f"AQIMODELS_DASHBOARD_PORT={raw!r} is not a port number (0-65535)")
            values["port"] = int(raw)
        for key, var in (("tls_cert", "AQIMODELS_DASHBOARD_TLS_CERT"), ("tls_key", "AQIMODELS_DASHBOARD_TLS_KEY"),
                         ("secret", "AQIMODELS_DASHBOARD_SECRET")):
            if env.get(var, "").strip():
                values[key] = env[var].strip()
        values.update({k: v for k, v in given.items() if v is not None})
        config = cls(**values)  # type: ignore[arg-type]  # values checked one by one above, typed per field
        return config.checked()

    def checked(self) -> DashboardConfig:
        if not 0 <= self.port <= 65535:
            raise DashboardConfigError(f"--port {self.port} is not a port number (0-65535)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise DashboardConfigError("AQIMODELS_DASHBOARD_TLS_CERT and AQIMODELS_DASHBOARD_TLS_KEY go together")
        for name, path in (("AQIMODELS_DASHBOARD_TLS_CERT", self.tls_cert), ("AQIMODELS_DASHBOARD_TLS_KEY",
                                                                           self.tls_key)):
            if path and not Path(path).is_file():
                raise DashboardConfigError(f"{name}: {path} does not exist")
        if self.secret and len(self.secret) < 16:
            raise DashboardConfigError("AQIMODELS_DASHBOARD_SECRET must be at least 16 characters")
        if not is_loopback(self.host) and not self.tls:
            raise DashboardConfigError(
                f"AQIMODELS_DASHBOARD_HOST={self.host} listens beyond loopback without TLS: refusing to send "
                "tokens and session cookies in clear. Set AQIMODELS_DASHBOARD_TLS_CERT and "
                "AQIMODELS_DASHBOARD_TLS_KEY (and give the registry a token file)")
        return self


