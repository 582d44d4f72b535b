"""The decisions a finished or starting retrain job takes: its promotion and its ensemble's members.

Kept in a module of their own so that changes to the promotion rule and the member resolution
stay apart from the job machinery (leases, dispatch, relay, persistence). ``JobDecisions`` is
mixed into ``JobManager``, which provides ``service`` and ``db``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client.domain import MEMBER_TYPES, TYPE_NAMES, Caller, ModelType, registered_model_name
from aqimodels.server import promotion_policy
from aqimodels.server.domain import MODEL_TYPE_TAG, Stage

if TYPE_CHECKING:
    from aqimodels.server.db import Database
    from aqimodels.server.service import RegistryService

log = structlog.get_logger(__name__)

DECISION_TAG = "aqimodels.promotion_decision"


class JobDecisions:
    """The promotion decision of a succeeded job and the members of an ensemble job."""

    service: RegistryService
    db: Database
    _load: Callable[[str], pb.RetrainJob]  # the job manager's read of a stored job

    def _resolve_members(self, job: Any = None, target: str = "",
                         retrained: list[ModelType] | None = None) -> list[wpb.EnsembleMember]:
        # The members trained in the same Retrain request (the jobs it waited for), else production;
        # before the jobs exist (``retrained``: the request's types), the production members only.
        same_request = {}
        for job_id in (job.depends_on if job is not None else []):
            proto = self._load(job_id)
            if proto.state == pb.JOB_STATE_SUCCEEDED and proto.version:
                same_request[proto.model_type] = (proto.model_name, proto.version)
        members = []
        for t in MEMBER_TYPES:
            if retrained is not None and t in retrained:
                continue
            name = registered_model_name(t, job.train_request.dataset.target if job is not None else target)
            if t in same_request:
                name, version = same_request[t]
            else:
                try:
                    snap = self.service.snapshot(name, fresh=True)
                except Exception:  # noqa: BLE001 - not registered yet: not a member
                    continue
                chosen = snap.alias("production") or (snap.versions[0] if snap.versions else None)
                if chosen is None:
                    continue
                version = chosen.version
            members.append(wpb.EnsembleMember(model_type=t, model_name=name, version=version,
                                              model_uri=f"models:/{name}/{version}"))
        return members

    def _decide_promotion(self, job: Any, name: str, version: int) -> pb.PromotionDecision:
        settings = job.settings
        metric = settings["metric"]
        decision = pb.PromotionDecision(considered=bool(settings["auto_promote"]), metric=metric)
        try:
            self.service.store.set_tag(name, version, MODEL_TYPE_TAG, TYPE_NAMES[job.proto.model_type])
        except Exception:  # noqa: BLE001 - the tag is informative only
            pass
        if not settings["auto_promote"]:
            decision.reason = "auto-promotion was not asked for"
            return decision
        snap = self.service.snapshot(name, fresh=True)
        candidate = snap.version(version)
        production = snap.alias("production")
        verdict = promotion_policy.decide(name, candidate, production, metric, settings["margin"],
                                          bool(settings.get("allow_data_change")))
        decision.candidate_value, decision.production_value = verdict.candidate_value, verdict.production_value
        decision.production_version = production.version if production else 0
        decision.promoted, decision.reason, decision.evaluated_on = verdict.promoted, verdict.reason, verdict.on_data
        caller = Caller("auto-promotion", "admin", job.proto.job_id)
        requested = ""
        if decision.promoted:
            try:
                result = self.service.promote(caller, name, version, Stage.PRODUCTION,
                                              decision.production_version or 0,
                                              allow_data_change=bool(settings.get("allow_data_change")))
                if result.promotion_request is not None:  # the approval policy: a request, nothing moved
                    requested = result.promotion_request.id
                    decision.promoted = False
                    decision.reason = (f"{decision.reason}; the approval policy made it promotion request "
                                       f"{requested}, which another admin must approve")
            except Exception as exc:  # noqa: BLE001 - e.g. a concurrent manual promotion won the race
                decision.promoted = False
                decision.reason = f"promotion refused: {exc}"
        payload = {"promoted": decision.promoted, "metric": metric, "candidate": _num(decision.candidate_value),
                   "production": _num(decision.production_value),
                   "production_version": decision.production_version or None, "reason": decision.reason,
                   "evaluated_on": decision.evaluated_on, **({"promotion_request": requested} if requested else {})}
        try:
            self.service.store.set_tag(name, version, DECISION_TAG, json.dumps(payload))
        except Exception:  # noqa: BLE001 - the decision is still audited below
            log.warning("decision_tag_failed", model=name, version=version)
        self.db.audit_record(actor=caller.name, role=caller.role, action="AutoPromotion", model_name=name,
                             version=version, before={"production": decision.production_version or None},
                             after={"production": version if decision.promoted else (decision.production_version or None),
                                    **payload},
                             outcome="ok" if decision.promoted else "requested" if requested else "declined",
                             request_id=job.proto.job_id, message=decision.reason)
        self.service.invalidate(name)
        return decision




def _num(value: float) -> float | None:
    return None if math.isnan(value) else value
