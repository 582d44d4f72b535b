"""The typed Python client of the ModelRegistry service.

Every failed call raises an error class of :mod:`aqimodels.client.errors` (by status code, one
table shared with the server); streaming calls raise mid-stream errors the same way.

Example::

    from aqimodels.client import RegistryClient

    with RegistryClient("127.0.0.1:50051") as registry:
        status = registry.status()
        registry.promote("aqi_predictor_lstm", 7, expected_current_version=6)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

import grpc

from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.registry.v1 import registry_pb2_grpc
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client.domain import MODEL_TYPES as MODEL_TYPES  # the vocabulary, also reached from here
from aqimodels.client.domain import model_type_name as model_type_name
from aqimodels.client.domain import model_type_value as model_type_value
from aqimodels.client.errors import InvalidArgumentError, error_from_rpc

T = TypeVar("T")

DEFAULT_TARGET = "127.0.0.1:50051"

STAGES: dict[str, pb.Stage.ValueType] = {
    "none": pb.STAGE_NONE,
    "staging": pb.STAGE_STAGING,
    "production": pb.STAGE_PRODUCTION,
    "archived": pb.STAGE_ARCHIVED,
}


def request_state_name(value: int) -> str:
    """``pending``, ``approved``... for a PromotionRequestState value."""
    return pb.PromotionRequestState.Name(value).removeprefix("PROMOTION_REQUEST_STATE_").lower()  # type: ignore[arg-type]


def request_state_value(state: str | int) -> pb.PromotionRequestState.ValueType:
    if isinstance(state, int):
        return state  # type: ignore[return-value]
    if not state:
        return pb.PROMOTION_REQUEST_STATE_UNSPECIFIED
    key = "PROMOTION_REQUEST_STATE_" + state.strip().upper().replace("-", "_")
    try:
        value = pb.PromotionRequestState.Value(key)
    except ValueError:
        value = pb.PROMOTION_REQUEST_STATE_UNSPECIFIED
    if value == pb.PROMOTION_REQUEST_STATE_UNSPECIFIED:
        raise InvalidArgumentError(f"unknown promotion request state {state!r}; use pending, approved, rejected, "
                                   "expired or aborted_stale", field="state")
    return value


def stage_value(stage: str | int | None) -> pb.Stage.ValueType:
    """The proto enum number of a stage given by name ("production") or number."""
    if stage is None or stage == "":
        return pb.STAGE_UNSPECIFIED
    if isinstance(stage, int):
        return pb.Stage.ValueType(stage)
    try:
        return STAGES[stage.strip().lower()]
    except KeyError:
        raise InvalidArgumentError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}",
                                   field="stage") from None


EVENT_TYPES: dict[str, int] = {
    name.removeprefix("REGISTRY_EVENT_TYPE_").lower(): number
    for name, number in pb.RegistryEventType.items() if number != pb.REGISTRY_EVENT_TYPE_UNSPECIFIED
}


def event_type_value(event_type: str | int) -> int:
    """The proto enum number of an event type given by name ("stage_changed") or number."""
    if isinstance(event_type, int):
        return event_type
    key = event_type.strip().lower().removeprefix("registry_event_type_")
    try:
        return EVENT_TYPES[key]
    except KeyError:
        raise InvalidArgumentError(f"unknown event type {event_type!r}; use one of {', '.join(EVENT_TYPES)}",
                                   field="types") from None


def event_type_name(value: int) -> str:
    return {v: k for k, v in EVENT_TYPES.items()}.get(value, "unspecified")


def stage_name(value: int) -> str:
    return {v: k for k, v in STAGES.items()}.get(pb.Stage.ValueType(value), "unspecified")


def _channel_credentials(ca_cert: str | None, client_cert: str | None,
                         client_key: str | None) -> grpc.ChannelCredentials | None:
    if not (ca_cert or client_cert):
        return None

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as fh:
            return fh.read()

    return grpc.ssl_channel_credentials(read(ca_cert), read(client_key), read(client_cert))


class RegistryClient:
    """A typed wrapper over the ModelRegistry stub.

    Args:
        target: ``host:port`` of the registry.
        token: bearer token sent in the ``authorization`` metadata.
        timeout: deadline in seconds of unary calls (streams take their own).
        ca_cert, client_cert, client_key: PEM files for TLS and mutual TLS.
        channel: an existing channel to use instead of opening one.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, timeout: float = 30.0,
                 ca_cert: str | None = None, client_cert: str | None = None, client_key: str | None = None,
                 channel: grpc.Channel | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._token = token
        options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        creds = _channel_credentials(ca_cert, client_cert, client_key)
        if channel is not None:
            self._channel = channel
        elif creds is not None:
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = registry_pb2_grpc.ModelRegistryStub(self._channel)

    # ---- plumbing ----

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self, request_id: str | None = None) -> list[tuple[str, str]]:
        md = [("x-request-id", request_id or os.urandom(16).hex())]
        if self._token:
            md.append(("authorization", f"Bearer {self._token}"))
        return md

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None = None,
               request_id: str | None = None) -> T:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata(request_id))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def _stream(self, method: Callable[..., Iterable[T]], request: Any, timeout: float | None) -> Iterator[T]:
        call = method(request, timeout=timeout, metadata=self._metadata())
        try:
            yield from call
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()

    @staticmethod
    def _pages(fetch: Callable[[str], Any], items: str) -> Iterator[Any]:
        token = ""
        while True:
            page = fetch(token)
            yield from getattr(page, items)
            token = page.next_page_token
            if not token:
                return

    # ---- health ----

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """The grpc.health.v1 status name of the server (SERVING, NOT_SERVING...)."""
        try:
            # Imported here: the health module is 60 ms of every CLI start, and only `health` needs it.
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            reply = health_pb2_grpc.HealthStub(self._channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                    timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    # ---- status and listing ----

    def status(self, *, page_size: int = 0, page_token: str = "", names: Sequence[str] = (),
               name_prefix: str = "") -> pb.GetStatusResponse:
        """The registry's status: every model (default), or one page of ``page_size`` models of
        those in ``names`` / starting with ``name_prefix``; backend, workers and server version."""
        return self._unary(self._stub.GetStatus, pb.GetStatusRequest(
            page_size=page_size, page_token=page_token, names=list(names), name_prefix=name_prefix))

    def iter_status(self, *, names: Sequence[str] = (), name_prefix: str = "",
                    page_size: int = 100) -> Iterator[pb.ModelStatus]:
        """Every matching model's status, a page at a time."""
        return self._pages(lambda t: self.status(page_size=page_size, page_token=t, names=names,
                                                 name_prefix=name_prefix), "models")

    def list_models(self, page_size: int = 0, page_token: str = "") -> pb.ListModelsResponse:
        return self._unary(self._stub.ListModels, pb.ListModelsRequest(page_size=page_size, page_token=page_token))

    def iter_models(self, page_size: int = 100) -> Iterator[pb.RegisteredModel]:
        return self._pages(lambda t: self.list_models(page_size, t), "models")

    def list_versions(self, name: str, *, stage: str | int | None = None, order_by: str = "",
                      page_size: int = 0, page_token: str = "") -> pb.ListModelVersionsResponse:
        return self._unary(self._stub.ListModelVersions, pb.ListModelVersionsRequest(
            name=name, stage=stage_value(stage), order_by=order_by, page_size=page_size, page_token=page_token))

    def iter_versions(self, name: str, *, stage: str | int | None = None, order_by: str = "",
                      page_size: int = 100) -> Iterator[pb.ModelVersion]:
        return self._pages(lambda t: self.list_versions(name, stage=stage, order_by=order_by,
                                                        page_size=page_size, page_token=t), "versions")

    def get_version(self, name: str, version: int) -> pb.ModelVersion:
        return self._unary(self._stub.GetModelVersion,
                           pb.GetModelVersionRequest(name=name, version=version)).version

    def version_at(self, name: str, stage: str | int, at: datetime | None, *,
                   version: int = 0) -> pb.GetModelVersionResponse:
        """The version that held ``stage`` (production or staging) at ``at`` (an aware datetime),
        with the period it held it (``held_from``, ``held_until``: unset while it still does)."""
        request = pb.GetModelVersionRequest(name=name, version=version,
                                            stage=pb.Stage.ValueType(stage_value(stage)))
        if at is not None:
            request.at.FromDatetime(at)
        return self._unary(self._stub.GetModelVersion, request)

    def compare(self, name: str, versions: Sequence[int] = (), metric: str = "") -> pb.CompareModelVersionsResponse:
        return self._unary(self._stub.CompareModelVersions,
                           pb.CompareModelVersionsRequest(name=name, versions=list(versions), metric=metric))

    # ---- lifecycle ----

    def promote(self, name: str, version: int = 0, stage: str | int = "production", *,
                expected_current_version: int | None = None, select_best_by: str = "",
                request_id: str = "", reason: str = "",
                allow_data_change: bool = False) -> pb.PromoteModelVersionResponse:
        request = pb.PromoteModelVersionRequest(name=name, version=version, stage=stage_value(stage),
                                                select_best_by=select_best_by, request_id=request_id,
                                                reason=reason, allow_data_change=allow_data_change)
        if expected_current_version is not None:
            request.expected_current_version = expected_current_version
        return self._unary(self._stub.PromoteModelVersion, request, request_id=request_id or None)

    def rollback(self, name: str, *, expected_current_version: int | None = None, request_id: str = "",
                 reason: str = "") -> pb.RollbackModelResponse:
        request = pb.RollbackModelRequest(name=name, request_id=request_id, reason=reason)
        if expected_current_version is not None:
            request.expected_current_version = expected_current_version
        return self._unary(self._stub.RollbackModel, request, request_id=request_id or None)

    def cleanup(self, name: str, keep_last: int = 0, *, versions: Sequence[int] = (), dry_run: bool = False,
                request_id: str = "") -> pb.CleanupModelVersionsResponse:
        return self._unary(self._stub.CleanupModelVersions, pb.CleanupModelVersionsRequest(
            name=name, keep_last=keep_last, versions=list(versions), dry_run=dry_run, request_id=request_id),
            request_id=request_id or None)

    def audit_events(self, *, model_name: str = "", actor: str = "", page_size: int = 0,
                     page_token: str = "") -> pb.ListAuditEventsResponse:
        return self._unary(self._stub.ListAuditEvents, pb.ListAuditEventsRequest(
            model_name=model_name, actor=actor, page_size=page_size, page_token=page_token))

    def iter_audit_events(self, *, model_name: str = "", actor: str = "",
                          page_size: int = 200) -> Iterator[pb.AuditEvent]:
        return self._pages(lambda t: self.audit_events(model_name=model_name, actor=actor, page_size=page_size,
                                                       page_token=t), "events")

    # ---- two-person approval of production promotions ----

    def set_approval_policy(self, model_name: str, required: bool, *, reason: str = "") -> pb.SetApprovalPolicyResponse:
        """``model_name`` a model or ``*`` (every model without an entry of its own)."""
        return self._unary(self._stub.SetApprovalPolicy, pb.SetApprovalPolicyRequest(
            model_name=model_name, required=required, reason=reason))

    def approval_policy(self, model_name: str = "") -> pb.GetApprovalPolicyResponse:
        return self._unary(self._stub.GetApprovalPolicy, pb.GetApprovalPolicyRequest(model_name=model_name))

    def promotion_requests(self, *, state: str | int = 0, model_name: str = "", page_size: int = 0,
                           page_token: str = "") -> pb.ListPromotionRequestsResponse:
        """``state``: pending, approved, rejected, expired, aborted_stale (or the enum value); empty: all."""
        return self._unary(self._stub.ListPromotionRequests, pb.ListPromotionRequestsRequest(
            state=request_state_value(state), model_name=model_name, page_size=page_size, page_token=page_token))

    def iter_promotion_requests(self, *, state: str | int = 0, model_name: str = "",
                                page_size: int = 200) -> Iterator[pb.PromotionRequest]:
        return self._pages(lambda t: self.promotion_requests(state=state, model_name=model_name,
                                                             page_size=page_size, page_token=t), "requests")

    def approve_promotion(self, request_id: str, *, reason: str = "") -> pb.ApprovePromotionResponse:
        return self._unary(self._stub.ApprovePromotion, pb.ApprovePromotionRequest(id=request_id, reason=reason))

    def reject_promotion(self, request_id: str, *, reason: str = "") -> pb.RejectPromotionResponse:
        return self._unary(self._stub.RejectPromotion, pb.RejectPromotionRequest(id=request_id, reason=reason))

    # ---- retrain and jobs ----

    def retrain(self, model_types: Sequence[str | int] = (), *, dataset: str = "", auto_promote: bool = False,
                params: wpb.TrainParams | None = None, promotion_metric: str = "", promotion_margin: float = 0.0,
                request_id: str = "", timeout: float | None = None, target: str = "",
                allow_data_change: bool = False) -> Iterator[pb.RetrainEvent]:
        """Starts one job per model type and yields their events until all have ended. ``target``: the
        pollutant to forecast (pm25 by default; pm10, no2, o3 register as ``aqi_predictor_<type>_<target>``)."""
        request = pb.RetrainRequest(
            model_types=[model_type_value(t) for t in model_types],
            dataset=wpb.DatasetSpec(spec=dataset, target=target),
            auto_promote=auto_promote, promotion_metric=promotion_metric, promotion_margin=promotion_margin,
            request_id=request_id, allow_data_change=allow_data_change)
        if params is not None:
            request.params.CopyFrom(params)
        return self._stream(self._stub.Retrain, request, timeout)

    def get_job(self, job_id: str) -> pb.RetrainJob:
        return self._unary(self._stub.GetRetrainJob, pb.GetRetrainJobRequest(job_id=job_id)).job

    def list_jobs(self, *, state: int = 0, model_name: str = "", page_size: int = 0,
                  page_token: str = "") -> pb.ListRetrainJobsResponse:
        return self._unary(self._stub.ListRetrainJobs, pb.ListRetrainJobsRequest(
            state=pb.JobState.ValueType(state), model_name=model_name, page_size=page_size, page_token=page_token))

    def watch_job(self, job_id: str, after_sequence: int = 0,
                  timeout: float | None = None) -> Iterator[pb.RetrainEvent]:
        return self._stream(self._stub.WatchRetrainJob,
                            pb.WatchRetrainJobRequest(job_id=job_id, after_sequence=after_sequence), timeout)

    def cancel_job(self, job_id: str, reason: str = "") -> pb.RetrainJob:
        return self._unary(self._stub.CancelRetrainJob,
                           pb.CancelRetrainJobRequest(job_id=job_id, reason=reason)).job

    # ---- monitoring ----

    def history(self, name: str, metric: str = "") -> pb.GetModelHistoryResponse:
        """Every version's metrics in creation order, with the production periods."""
        return self._unary(self._stub.GetModelHistory, pb.GetModelHistoryRequest(name=name, metric=metric))

    def report_performance(self, name: str, version: int, *, rmse: float = 0.0, mae: float = 0.0,
                           sample_count: int = 0, pairs: Sequence[tuple[float, float]] = (),
                           window_end: Any = None, request_id: str = "") -> pb.ReportPerformanceResponse:
        """Reports a version's live accuracy: a window's rmse/mae and sample count, or (predicted, actual) pairs.

        Args:
            window_end: end of the reported window (a datetime or Timestamp; default: now on the server).
            request_id: idempotency key: a retry with it is counted once and gets the first answer.
        """
        request = pb.ReportPerformanceRequest(
            name=name, version=version, rmse=rmse, mae=mae, sample_count=sample_count,
            pairs=[pb.PredictionPair(predicted=p, actual=a) for p, a in pairs], request_id=request_id)
        if window_end is not None:
            if hasattr(window_end, "timestamp"):
                request.window_end.FromDatetime(window_end)
            else:
                request.window_end.CopyFrom(window_end)
        return self._unary(self._stub.ReportPerformance, request, request_id=request_id or None)

    def watch_alerts(self, model_name: str = "", timeout: float | None = None) -> Iterator[pb.Alert]:
        """Degradation alerts as they are raised (of one model, or all), until closed."""
        return self._stream(self._stub.WatchAlerts, pb.WatchAlertsRequest(model_name=model_name), timeout)

    # ---- webhooks (admin) ----

    def create_webhook(self, url: str, event_types: Sequence[str | int] = (), *, secret: str,
                       model_name: str = "") -> pb.Webhook:
        """A new webhook for the events committed from now on (``event_types``: e.g. "stage_changed"; none: all)."""
        return self._unary(self._stub.CreateWebhook, pb.CreateWebhookRequest(
            url=url, event_types=webhook_event_types(event_types), model_name=model_name, secret=secret)).webhook

    def list_webhooks(self) -> list[pb.Webhook]:
        return list(self._unary(self._stub.ListWebhooks, pb.ListWebhooksRequest()).webhooks)

    def delete_webhook(self, webhook_id: str) -> pb.Webhook:
        return self._unary(self._stub.DeleteWebhook, pb.DeleteWebhookRequest(webhook_id=webhook_id)).webhook

    def test_webhook(self, webhook_id: str) -> pb.WebhookDelivery:
        """Sends a test delivery now and returns how it went (one attempt, logged)."""
        return self._unary(self._stub.TestWebhook, pb.TestWebhookRequest(webhook_id=webhook_id)).delivery

    def webhook_deliveries(self, webhook_id: str, *, event_sequence: int = 0, page_size: int = 0,
                           page_token: str = "") -> pb.ListWebhookDeliveriesResponse:
        return self._unary(self._stub.ListWebhookDeliveries, pb.ListWebhookDeliveriesRequest(
            webhook_id=webhook_id, event_sequence=event_sequence, page_size=page_size, page_token=page_token))

    def iter_webhook_deliveries(self, webhook_id: str, *, event_sequence: int = 0,
                                page_size: int = 200) -> Iterator[pb.WebhookDelivery]:
        """Every logged attempt of a webhook, newest first."""
        return self._pages(lambda t: self.webhook_deliveries(webhook_id, event_sequence=event_sequence,
                                                             page_size=page_size, page_token=t), "deliveries")

    def redeliver_webhook(self, webhook_id: str, *, event_sequence: int = 0,
                          delivery_id: str = "") -> pb.WebhookDelivery:
        """Sends one event (by sequence, or the one of a logged delivery) to the webhook again now."""
        return self._unary(self._stub.RedeliverWebhook, pb.RedeliverWebhookRequest(
            webhook_id=webhook_id, event_sequence=event_sequence, delivery_id=delivery_id)).delivery

    # ---- events ----

    def watch_events(self, after_sequence: int = 0, *, model_names: Sequence[str] = (),
                     types: Sequence[str | int] = (), follow: bool = True,
                     timeout: float | None = None) -> Iterator[pb.RegistryEvent]:
        """Registry events after ``after_sequence`` (stored ones, then live unless ``follow`` is False), until closed.

        Resume after a disconnect with the last ``sequence`` seen: nothing is missed or repeated.
        """
        kinds = [pb.RegistryEventType.ValueType(event_type_value(t)) for t in types]
        request = pb.WatchRegistryEventsRequest(after_sequence=after_sequence, model_names=list(model_names),
                                                types=kinds, replay_only=not follow)
        return self._stream(self._stub.WatchRegistryEvents, request, timeout)


def webhook_event_types(names: Iterable[str | int]) -> list[pb.RegistryEventType.ValueType]:
    """RegistryEventType numbers of event types given by number or name ("stage_changed")."""
    return [pb.RegistryEventType.ValueType(event_type_value(n)) for n in names]
