"""``aqimodels serve``: reads the configuration once, configures logging, runs the registry."""

from __future__ import annotations

import dataclasses
import os
import sys

from aqimodels.client import logs
from aqimodels.client.errors import BackendUnavailableError
from aqimodels.server.config import ConfigError, ServerConfig


def main(host: str | None = None, port: int | None = None) -> int:
    """Starts the registry (and a local worker unless AQIMODELS_WORKERS says otherwise)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        config = ServerConfig.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    overrides: dict[str, object] = {}
    if host:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    try:
        config = dataclasses.replace(config, **overrides).checked()  # type: ignore[arg-type]  # the overrides are host (str) and port (int), as the fields
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(json=config.log_json, level=config.log_level)
    # The registry reads no data files. pandas 3 (imported by MLflow) loads pyarrow whenever it
    # is installed, as the worker needs it: 67 MB of the registry's resident memory and part of
    # its start-up. Marked absent here, pandas keeps its own string storage. The local worker is
    # its own process and loads pyarrow as usual.
    sys.modules.setdefault("pyarrow", None)  # type: ignore[arg-type]  # None marks a module absent, which typeshed does not model
    from aqimodels.server.app import serve
    from aqimodels.server.jobs import jobs_factory

    try:
        return serve(config, jobs_factory=jobs_factory)
    except ConfigError as exc:  # found while starting (e.g. a token file entry without a role)
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except BackendUnavailableError as exc:  # a database frozen or unreachable at start, past its bound
        print(f"registry not started: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
