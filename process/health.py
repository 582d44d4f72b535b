"""grpc.health.v1.Health for the registry and the worker: grpcio-health-checking's servicer plus List.

The library's servicer answers Check and Watch; List (added to health.proto later) falls to the
generated base class, which answers UNIMPLEMENTED and logs a traceback. Here it answers the
status of every registered service.
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health, health_pb2


class HealthServicer(health.HealthServicer):  # type: ignore[misc]  # grpc_health's servicer is unannotated
    """Check, Watch and List over the statuses set with ``set``."""

    def List(self, request: health_pb2.HealthListRequest, context: Any) -> health_pb2.HealthListResponse:
        with self._lock:
            statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()})
