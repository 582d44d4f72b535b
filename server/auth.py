"""Which role may call each registry RPC; the token check itself is ``aqimodels.process.auth``.

``RPC_ROLES`` maps every RPC of both services, streaming ones included, to the lowest role
allowed to call it (``viewer`` < ``operator`` < ``admin``); a test walks it. A denial is audited
with the caller's name (or ``anonymous``).
"""

from __future__ import annotations

from aqimodels.process.auth import WORKER_RPC_ROLES, Authenticator, AuditSink
from aqimodels.process.auth import authenticator as process_authenticator

__all__ = ["MUTATING_RPCS", "RPC_ROLES", "authenticator"]

_REGISTRY = "/aqimodels.api.registry.v1.ModelRegistry/"

# Every RPC and the lowest role that may call it. A new RPC missing here is refused (and a test
# fails), so nothing is reachable by accident.
RPC_ROLES: dict[str, str] = {
    _REGISTRY + "GetStatus": "viewer",
    _REGISTRY + "ListModels": "viewer",
    _REGISTRY + "ListModelVersions": "viewer",
    _REGISTRY + "GetModelVersion": "viewer",
    _REGISTRY + "CompareModelVersions": "viewer",
    _REGISTRY + "ListAuditEvents": "viewer",
    _REGISTRY + "GetRetrainJob": "viewer",
    _REGISTRY + "ListRetrainJobs": "viewer",
    _REGISTRY + "WatchRetrainJob": "viewer",
    _REGISTRY + "GetModelHistory": "viewer",
    _REGISTRY + "WatchAlerts": "viewer",
    _REGISTRY + "WatchRegistryEvents": "viewer",
    _REGISTRY + "Retrain": "operator",
    _REGISTRY + "CancelRetrainJob": "operator",
    _REGISTRY + "ReportPerformance": "operator",
    _REGISTRY + "PromoteModelVersion": "admin",
    _REGISTRY + "RollbackModel": "admin",
    _REGISTRY + "CleanupModelVersions": "admin",
    _REGISTRY + "CreateWebhook": "admin",
    _REGISTRY + "ListWebhooks": "admin",
    _REGISTRY + "DeleteWebhook": "admin",
    _REGISTRY + "TestWebhook": "admin",
    _REGISTRY + "ListWebhookDeliveries": "admin",
    _REGISTRY + "RedeliverWebhook": "admin",
    _REGISTRY + "GetApprovalPolicy": "viewer",
    _REGISTRY + "ListPromotionRequests": "viewer",
    _REGISTRY + "SetApprovalPolicy": "admin",
    _REGISTRY + "ApprovePromotion": "admin",
    _REGISTRY + "RejectPromotion": "admin",
    **WORKER_RPC_ROLES,
}

# RPCs that change the registry: each must leave an audit record (checked by a test).
MUTATING_RPCS: tuple[str, ...] = ("PromoteModelVersion", "RollbackModel", "CleanupModelVersions", "Retrain",
                                  "CancelRetrainJob", "ReportPerformance", "CreateWebhook", "DeleteWebhook",
                                  "TestWebhook", "RedeliverWebhook", "SetApprovalPolicy", "ApprovePromotion",
                                  "RejectPromotion")


def authenticator(tokens_file: str, audit: AuditSink | None, component: str,
                  registry_token: str = "") -> Authenticator:
    """The registry's authenticator over :data:`RPC_ROLES` (see ``process.auth.authenticator``)."""
    return process_authenticator(tokens_file, audit, component, RPC_ROLES, registry_token)
