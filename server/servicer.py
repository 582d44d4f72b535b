"""ModelRegistry servicer: translation only. Unpack the request, call the service, pack the answer.

Errors are raised as domain errors and mapped to status codes by the interceptor.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.registry.v1 import registry_pb2_grpc
from aqimodels.client.domain import Caller
from aqimodels.client.errors import InvalidArgumentError, UnimplementedError
from aqimodels.server import convert
from aqimodels.process import deadlines
from aqimodels.server import approvals, events
from aqimodels.server.domain import Stage
from aqimodels.process.interceptors import Wire, current_caller, current_request_id
from aqimodels.server.service import PromotionResult, RegistryService
from aqimodels.server.webhook_convert import delivery_to_proto, event_types_from_proto, webhook_to_proto

if TYPE_CHECKING:
    from aqimodels.server.events import EventLog
    from aqimodels.server.jobs import JobManager
    from aqimodels.server.monitoring import Monitor
    from aqimodels.server.webhooks import WebhookService
    from aqimodels.server.workers import WorkerPool

SERVER_VERSION = importlib.metadata.version("aqimodels")  # the installed distribution's


def _caller(request_id: str = "") -> Caller:
    """Who calls, with the call's deadline; the request's own idempotency key wins over x-request-id."""
    rid = request_id[:200] or current_request_id()
    caller = current_caller()
    if caller is not None:
        return Caller(caller.name, caller.role, rid, deadlines.current())
    return Caller(request_id=rid, deadline=deadlines.current())


def _call_ended(context: grpc.ServicerContext) -> threading.Event:
    """Set when the caller goes away (cancel, deadline, disconnect): streams stop following then."""
    ended = threading.Event()
    if not context.add_callback(ended.set):  # False: the caller is already gone
        ended.set()
    return ended


def _stage_filter(value: int, field: str) -> Stage | None:
    if value == pb.STAGE_UNSPECIFIED:
        return None
    stage = convert.stage_from_proto(value)
    if stage is None:
        raise InvalidArgumentError(f"{field} {value} is not a known stage", field=field)
    return stage


class ModelRegistryServicer(registry_pb2_grpc.ModelRegistryServicer):
    """The ModelRegistry RPCs over a RegistryService (and, once wired, a job manager)."""

    def __init__(self, service: RegistryService, jobs: JobManager | None = None, workers: WorkerPool | None = None,
                 monitor: Monitor | None = None, events: EventLog | None = None,
                 webhooks: WebhookService | None = None) -> None:
        self._service = service
        self._events = events
        self._jobs = jobs
        self._workers = workers
        self._monitor = monitor
        self._webhooks = webhooks

    # ---- status and listing ----

    # The hot reads answer in wire format (see interceptors.Wire): the same bytes, sent as they are.

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> Wire:  # type: ignore[override]  # answers with the wire bytes kept in the read model
        page, health = self._service.status(request.page_size, request.page_token, list(request.names),
                                            request.name_prefix)
        return convert.status_wire(page.items, health, self._workers.status() if self._workers is not None else [],
                                   SERVER_VERSION, page.next_page_token, page.total_size)

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        page = self._service.list_models(request.page_size, request.page_token)
        return pb.ListModelsResponse(models=[convert.registered_model_to_proto(m) for m in page.items],
                                     next_page_token=page.next_page_token, total_size=page.total_size)

    def ListModelVersions(self, request: pb.ListModelVersionsRequest,  # type: ignore[override]  # the wire bytes, as above
                          context: grpc.ServicerContext) -> Wire:
        page = self._service.list_versions(request.name, request.page_size, request.page_token,
                                           _stage_filter(request.stage, "stage"), request.order_by)
        return convert.versions_page_wire(page.items, page.next_page_token, page.total_size)

    def GetModelVersion(self, request: pb.GetModelVersionRequest,
                        context: grpc.ServicerContext) -> pb.GetModelVersionResponse:
        if request.stage or request.HasField("at"):
            held = self._monitoring().version_at(
                request.name, request.version, _stage_filter(request.stage, "stage"),
                convert.ms_from_ts(request.at, "at") if request.HasField("at") else None)
            response = pb.GetModelVersionResponse(version=convert.model_version_to_proto(held.version))
            if held.start_ms:
                response.held_from.FromMilliseconds(held.start_ms)
            if held.end_ms:
                response.held_until.FromMilliseconds(held.end_ms)
            return response
        version = self._service.get_version(request.name, request.version)
        return pb.GetModelVersionResponse(version=convert.model_version_to_proto(version))

    def CompareModelVersions(self, request: pb.CompareModelVersionsRequest,  # type: ignore[override]  # the wire bytes, as above
                             context: grpc.ServicerContext) -> Wire:
        comparison = self._service.compare(request.name, list(request.versions), request.metric)
        return convert.comparison_wire(comparison)

    # ---- lifecycle ----

    def PromoteModelVersion(self, request: pb.PromoteModelVersionRequest,
                            context: grpc.ServicerContext) -> pb.PromoteModelVersionResponse:
        stage = convert.stage_from_proto(request.stage) if request.stage else None
        expected = request.expected_current_version if request.HasField("expected_current_version") else None
        result = self._service.promote(_caller(request.request_id), request.name, request.version, stage, expected,
                                       request.select_best_by, request.reason,
                                       allow_data_change=request.allow_data_change)
        return _promotion_to_proto(result)

    def RollbackModel(self, request: pb.RollbackModelRequest,
                      context: grpc.ServicerContext) -> pb.RollbackModelResponse:
        expected = request.expected_current_version if request.HasField("expected_current_version") else None
        result = self._service.rollback(_caller(request.request_id), request.name, expected, request.reason)
        return pb.RollbackModelResponse(version=convert.model_version_to_proto(result.version),
                                        replaced_version=result.previous_version,
                                        audit_event_id=result.audit_event_id)

    def CleanupModelVersions(self, request: pb.CleanupModelVersionsRequest,
                             context: grpc.ServicerContext) -> pb.CleanupModelVersionsResponse:
        cleanup = self._monitor.cleanup if self._monitor is not None else self._service.cleanup
        result = cleanup(_caller(request.request_id), request.name, request.keep_last, list(request.versions), request.dry_run)
        return pb.CleanupModelVersionsResponse(
            deleted_versions=result.deleted, kept_versions=result.kept, protected_versions=result.protected,
            dry_run=result.dry_run, audit_event_id=result.audit_event_id)

    def ListAuditEvents(self, request: pb.ListAuditEventsRequest,
                        context: grpc.ServicerContext) -> pb.ListAuditEventsResponse:
        page = self._service.audit_events(
            request.page_size, request.page_token, request.model_name, request.actor,
            convert.ms_from_ts(request.start_time) if request.HasField("start_time") else None,
            convert.ms_from_ts(request.end_time) if request.HasField("end_time") else None)
        return pb.ListAuditEventsResponse(events=[convert.audit_to_proto(r) for r in page.items],
                                          next_page_token=page.next_page_token)

    # ---- retrain and jobs ----

    def _job_manager(self) -> JobManager:
        if self._jobs is None:
            raise UnimplementedError("retraining is not available on this server: it was started without "
                                     "a job manager")
        return self._jobs

    def Retrain(self, request: pb.RetrainRequest, context: grpc.ServicerContext) -> Iterator[pb.RetrainEvent]:
        yield from self._job_manager().retrain(request, _caller(), _call_ended(context))

    def GetRetrainJob(self, request: pb.GetRetrainJobRequest,
                      context: grpc.ServicerContext) -> pb.GetRetrainJobResponse:
        return pb.GetRetrainJobResponse(job=self._job_manager().get(request.job_id))

    def ListRetrainJobs(self, request: pb.ListRetrainJobsRequest,
                        context: grpc.ServicerContext) -> pb.ListRetrainJobsResponse:
        jobs, token = self._job_manager().list_jobs(request.page_size, request.page_token,
                                               request.state, request.model_name)
        return pb.ListRetrainJobsResponse(jobs=jobs, next_page_token=token)

    def WatchRetrainJob(self, request: pb.WatchRetrainJobRequest,
                        context: grpc.ServicerContext) -> Iterator[pb.RetrainEvent]:
        yield from self._job_manager().watch(request.job_id, request.after_sequence, _call_ended(context))

    def CancelRetrainJob(self, request: pb.CancelRetrainJobRequest,
                         context: grpc.ServicerContext) -> pb.CancelRetrainJobResponse:
        return pb.CancelRetrainJobResponse(job=self._job_manager().cancel(request.job_id, request.reason,
                                                                          _caller()))

    # ---- monitoring ----

    def _monitoring(self) -> Monitor:
        if self._monitor is None:
            raise UnimplementedError("monitoring is not available on this server: it was started without a monitor")
        return self._monitor

    def GetModelHistory(self, request: pb.GetModelHistoryRequest,
                        context: grpc.ServicerContext) -> pb.GetModelHistoryResponse:
        return convert.history_to_proto(self._monitoring().history(request.name, request.metric))

    def ReportPerformance(self, request: pb.ReportPerformanceRequest,
                          context: grpc.ServicerContext) -> pb.ReportPerformanceResponse:
        outcome = self._monitoring().report(
            _caller(), request.name, request.version, request.rmse, request.mae, request.sample_count,
            [(p.predicted, p.actual) for p in request.pairs],
            convert.ms_from_ts(request.window_end) if request.HasField("window_end") else 0,
            request_id=request.request_id[:200])
        return pb.ReportPerformanceResponse(health=convert.health_to_proto(outcome.health), ratio=outcome.ratio)

    def WatchAlerts(self, request: pb.WatchAlertsRequest, context: grpc.ServicerContext) -> Iterator[pb.Alert]:
        for alert in self._monitoring().watch(request.model_name, context):
            yield convert.alert_to_proto(alert)

    # ---- events ----

    def WatchRegistryEvents(self, request: pb.WatchRegistryEventsRequest,
                            context: grpc.ServicerContext) -> Iterator[pb.RegistryEvent]:
        if self._events is None:
            raise UnimplementedError("events are not available on this server: it was started without an event log")
        for event in self._events.watch(request.after_sequence, list(request.model_names),
                                        events.types_from_proto(request.types), _call_ended(context),
                                        live=not request.replay_only):
            yield events.to_proto(event)

    # ---- webhooks ----

    def _webhook_service(self) -> WebhookService:
        if self._webhooks is None:
            raise UnimplementedError("webhooks are not available on this server: it was started without them")
        return self._webhooks

    def CreateWebhook(self, request: pb.CreateWebhookRequest,
                      context: grpc.ServicerContext) -> pb.CreateWebhookResponse:
        hook = self._webhook_service().create(_caller(), request.url, event_types_from_proto(request.event_types),
                                              request.model_name, request.secret)
        return pb.CreateWebhookResponse(webhook=webhook_to_proto(hook))

    def ListWebhooks(self, request: pb.ListWebhooksRequest, context: grpc.ServicerContext) -> pb.ListWebhooksResponse:
        return pb.ListWebhooksResponse(webhooks=[webhook_to_proto(h) for h in self._webhook_service().list()])

    def DeleteWebhook(self, request: pb.DeleteWebhookRequest,
                      context: grpc.ServicerContext) -> pb.DeleteWebhookResponse:
        return pb.DeleteWebhookResponse(webhook=webhook_to_proto(
            self._webhook_service().delete(_caller(), request.webhook_id)))

    def TestWebhook(self, request: pb.TestWebhookRequest, context: grpc.ServicerContext) -> pb.TestWebhookResponse:
        return pb.TestWebhookResponse(delivery=delivery_to_proto(
            self._webhook_service().test(_caller(), request.webhook_id)))

    def ListWebhookDeliveries(self, request: pb.ListWebhookDeliveriesRequest,
                              context: grpc.ServicerContext) -> pb.ListWebhookDeliveriesResponse:
        page = self._webhook_service().deliveries(request.webhook_id, request.page_size, request.page_token,
                                                  request.event_sequence)
        return pb.ListWebhookDeliveriesResponse(deliveries=[delivery_to_proto(d) for d in page.items],
                                                next_page_token=page.next_page_token)

    def RedeliverWebhook(self, request: pb.RedeliverWebhookRequest,
                         context: grpc.ServicerContext) -> pb.RedeliverWebhookResponse:
        return pb.RedeliverWebhookResponse(delivery=delivery_to_proto(self._webhook_service().redeliver(
            _caller(), request.webhook_id, request.event_sequence, request.delivery_id)))

    # ---- two-person approval of production promotions ----

    def SetApprovalPolicy(self, request: pb.SetApprovalPolicyRequest,
                          context: grpc.ServicerContext) -> pb.SetApprovalPolicyResponse:
        caller = _caller()
        entry = self._service.approvals.set_policy(caller.name, caller.role, caller.request_id, request.model_name,
                                                   request.required, request.reason)
        return pb.SetApprovalPolicyResponse(entry=_policy_entry_to_proto(entry), audit_event_id=entry.audit_event_id)

    def GetApprovalPolicy(self, request: pb.GetApprovalPolicyRequest,
                          context: grpc.ServicerContext) -> pb.GetApprovalPolicyResponse:
        policy = self._service.approvals.policy(request.model_name)
        return pb.GetApprovalPolicyResponse(environment_models=list(policy.environment),
                                            stored=[_policy_entry_to_proto(e) for e in policy.stored],
                                            required=policy.required, source=policy.source)

    def ListPromotionRequests(self, request: pb.ListPromotionRequestsRequest,
                              context: grpc.ServicerContext) -> pb.ListPromotionRequestsResponse:
        state = ""
        if request.state:
            if request.state not in _REQUEST_STATES:
                raise InvalidArgumentError(f"state {request.state} is not a promotion request state", field="state")
            state = _REQUEST_STATES[request.state]
        page = self._service.approvals.list(state, request.model_name, request.page_size, request.page_token)
        return pb.ListPromotionRequestsResponse(requests=[_request_to_proto(r) for r in page.items],
                                                next_page_token=page.next_page_token)

    def ApprovePromotion(self, request: pb.ApprovePromotionRequest,
                         context: grpc.ServicerContext) -> pb.ApprovePromotionResponse:
        req, result = self._service.approve_promotion(_caller(), request.id, request.reason)
        return pb.ApprovePromotionResponse(promotion_request=_request_to_proto(req),
                                           promotion=_promotion_to_proto(result))

    def RejectPromotion(self, request: pb.RejectPromotionRequest,
                        context: grpc.ServicerContext) -> pb.RejectPromotionResponse:
        caller = _caller()
        req = self._service.approvals.reject(caller.name, caller.role, caller.request_id, request.id,
                                             request.reason, caller.deadline)
        return pb.RejectPromotionResponse(promotion_request=_request_to_proto(req))


_REQUEST_STATES: dict[int, str] = {
    pb.PROMOTION_REQUEST_STATE_PENDING: approvals.PENDING, pb.PROMOTION_REQUEST_STATE_APPROVED: approvals.APPROVED,
    pb.PROMOTION_REQUEST_STATE_REJECTED: approvals.REJECTED, pb.PROMOTION_REQUEST_STATE_EXPIRED: approvals.EXPIRED,
    pb.PROMOTION_REQUEST_STATE_ABORTED_STALE: approvals.ABORTED_STALE}
_REQUEST_STATE_VALUES = {name: value for value, name in _REQUEST_STATES.items()}


def _request_to_proto(r: approvals.PromotionRequest) -> pb.PromotionRequest:
    out = pb.PromotionRequest(
        id=r.id, model_name=r.model_name, version=r.version, expected_current_version=r.expected_current,
        requested_by=r.requested_by, reason=r.reason, state=_REQUEST_STATE_VALUES[r.state],  # type: ignore[arg-type]
        create_time=convert.ts_from_ms(r.create_ms), expire_time=convert.ts_from_ms(r.expire_ms),
        closed_by=r.closed_by, close_reason=r.close_reason, allow_data_change=r.allow_data_change)
    if r.close_ms:
        out.close_time.CopyFrom(convert.ts_from_ms(r.close_ms))
    return out


def _policy_entry_to_proto(e: approvals.PolicyEntry) -> pb.ApprovalPolicyEntry:
    return pb.ApprovalPolicyEntry(model_name=e.model_name, required=e.required, updated_by=e.updated_by,
                                  update_time=convert.ts_from_ms(e.update_ms))


def _promotion_to_proto(result: PromotionResult) -> pb.PromoteModelVersionResponse:
    out = pb.PromoteModelVersionResponse(
        version=convert.model_version_to_proto(result.version), previous_version=result.previous_version,
        archived_versions=result.archived_versions, audit_event_id=result.audit_event_id)
    if result.promotion_request is not None:
        out.promotion_request.CopyFrom(_request_to_proto(result.promotion_request))
    return out
