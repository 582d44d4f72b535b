"""The decisions a finished or starting retrain job takes: its promotion and its ensemble's members.

Kept in a module of their own so that changes to the promotion rule and the member resolution
stay apart from the job machinery (leases, dispatch, relay, persistence). ``JobDecisions`` is
mixed into ``JobManager``, which provides ``service`` and ``db``.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import structlog

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.server.domain import MODEL_TYPE_TAG, Stage, is_better
from aqimodels.server.service import Caller

if TYPE_CHECKING:
    from aqimodels.server.db import Database
    from aqimodels.server.service import RegistryService

log = structlog.get_logger(__name__)

TYPE_NAMES = {wpb.MODEL_TYPE_XGBOOST: "xgboost", wpb.MODEL_TYPE_LSTM: "lstm", wpb.MODEL_TYPE_GNN: "gnn",
              wpb.MODEL_TYPE_ENSEMBLE: "ensemble"}
MEMBER_TYPES = (wpb.MODEL_TYPE_XGBOOST, wpb.MODEL_TYPE_LSTM, wpb.MODEL_TYPE_GNN)
DECISION_TAG = "aqimodels.promotion_decision"


def model_name_for(model_type: int) -> str:
    return f"aqi_predictor_{TYPE_NAMES[model_type]}"


class JobDecisions:
    """The promotion decision of a succeeded job and the members of an ensemble job."""

    service: RegistryService
    db: Database

    def _resolve_members(self) -> list[wpb.EnsembleMember]:
        members = []
        for t in MEMBER_TYPES:
            name = model_name_for(t)
            try:
                snap = self.service.snapshot(name, fresh=True)
            except Exception:  # noqa: BLE001 - not registered yet: not a member
                continue
            chosen = snap.alias("production") or (snap.versions[0] if snap.versions else None)
            if chosen is not None:
                members.append(wpb.EnsembleMember(model_type=t, model_name=name, version=chosen.version,
                                                  model_uri=f"models:/{name}/{chosen.version}"))
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
        decision.candidate_value = candidate.metrics.get(metric, math.nan)
        decision.production_value = production.metrics.get(metric, math.nan) if production else math.nan
        decision.production_version = production.version if production else 0
        if math.isnan(decision.candidate_value):
            decision.reason = f"version {version} has no {metric} metric"
        elif production is None:
            decision.promoted = True
            decision.reason = "no version was in production"
        elif is_better(metric, decision.candidate_value, decision.production_value, settings["margin"]):
            decision.promoted = True
            decision.reason = (f"{metric} {decision.candidate_value:.4g} beats production v{production.version} "
                               f"({decision.production_value:.4g}) by the required margin {settings['margin']:.1%}")
        else:
            decision.reason = (f"{metric} {decision.candidate_value:.4g} does not beat production "
                               f"v{production.version} ({decision.production_value:.4g}) by the required margin "
                               f"{settings['margin']:.1%}")
        caller = Caller("auto-promotion", "admin", job.proto.job_id)
        if decision.promoted:
            try:
                self.service.promote(caller, name, version, Stage.PRODUCTION,
                                     decision.production_version or 0)
            except Exception as exc:  # noqa: BLE001 - e.g. a concurrent manual promotion won the race
                decision.promoted = False
                decision.reason = f"promotion refused: {exc}"
        payload = {"promoted": decision.promoted, "metric": metric, "candidate": _num(decision.candidate_value),
                   "production": _num(decision.production_value),
                   "production_version": decision.production_version or None, "reason": decision.reason}
        try:
            self.service.store.set_tag(name, version, DECISION_TAG, json.dumps(payload))
        except Exception:  # noqa: BLE001
            log.warning("decision_tag_failed", model=name, version=version)
        self.db.audit_record(actor=caller.name, role=caller.role, action="AutoPromotion", model_name=name,
                             version=version, before={"production": decision.production_version or None},
                             after={"production": version if decision.promoted else (decision.production_version or None),
                                    **payload}, outcome="ok" if decision.promoted else "declined",
                             request_id=job.proto.job_id, message=decision.reason)
        self.service.invalidate(name)
        return decision



def _num(value: float) -> float | None:
    return None if math.isnan(value) else value
