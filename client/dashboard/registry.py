"""The dashboard's registry access: the ModelRegistry stub on one grpc.aio channel, a token per call.

The dashboard serves many browsers, each with its own token, from one event loop: every method
takes the caller's token (roles apply unchanged at the registry) and raises the error classes of
:mod:`aqimodels.client.errors` through the same table as :class:`aqimodels.client.RegistryClient`.
Requests are built with the sync client's helpers (stage and model-type names).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import unquote

import grpc
import grpc.aio
from aqimodels.api.registry.v1 import registry_pb2 as pb
from aqimodels.api.registry.v1 import registry_pb2_grpc
from aqimodels.api.training.v1 import worker_pb2 as wpb
from aqimodels.client.client import _channel_credentials, stage_value
from aqimodels.client.domain import model_type_value
from aqimodels.client.errors import error_from_rpc

T = TypeVar("T")

# Trailing metadata in which the registry names the authenticated caller of every call.
CALLER_KEY = "x-aqimodels-caller"
ROLE_KEY = "x-aqimodels-role"


@dataclass(frozen=True)
class Identity:
    """Who the registry says the caller is (from a call's trailing metadata)."""

    name: str
    role: str


class AsyncRegistry:
    """The ModelRegistry API over grpc.aio for a multi-user process.

    Args:
        target: ``host:port`` of the registry.
        timeout: deadline of unary calls, seconds.
        ca_cert, client_cert, client_key: PEM files for TLS and mutual TLS (as the CLI's options).
    """

    def __init__(self, target: str, *, timeout: float = 30.0, ca_cert: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None) -> None:
        self.target = target
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        creds = _channel_credentials(ca_cert, client_cert, client_key)
        self._channel = (grpc.aio.secure_channel(target, creds, options=options) if creds is not None
                         else grpc.aio.insecure_channel(target, options=options))
        self._stub = registry_pb2_grpc.ModelRegistryStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    @staticmethod
    def _metadata(token: str | None) -> list[tuple[str, str]]:
        md = [("x-request-id", uuid.uuid4().hex)]
        if token:
            md.append(("authorization", f"Bearer {token}"))
        return md

    async def _unary(self, rpc: str, request: Any, token: str | None, reply: type[T]) -> T:
        """One unary call; ``reply`` types the answer (the aio stub's methods are looked up by name)."""
        try:
            return cast(T, await getattr(self._stub, rpc)(request, timeout=self.timeout,
                                                          metadata=self._metadata(token)))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def _stream(self, rpc: str, request: Any, token: str | None) -> AsyncIterator[Any]:
        call = getattr(self._stub, rpc)(request, metadata=self._metadata(token))
        try:
            async for item in call:
                yield item
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    # ---- who is calling ----

    async def identify(self, token: str | None) -> Identity:
        """Checks a token with a cheap viewer call; the registry names the caller and role in its trailers."""
        call = self._stub.ListModels(pb.ListModelsRequest(page_size=1), timeout=self.timeout,
                                     metadata=self._metadata(token))
        try:
            await call
            trailers = dict(await call.trailing_metadata() or ())
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        name, role = trailers.get(CALLER_KEY), trailers.get(ROLE_KEY)
        # A registry that predates these trailers: without a token it lets everyone in as admin.
        return Identity(unquote(str(name or "anonymous")), str(role or ("viewer" if token else "admin")))

    # ---- reads ----

    async def status(self, token: str | None) -> pb.GetStatusResponse:
        return await self._unary("GetStatus", pb.GetStatusRequest(), token, pb.GetStatusResponse)

    async def list_versions(self, token: str | None, name: str, *, stage: str | None = None, order_by: str = "",
                            page_size: int = 50, page_token: str = "") -> pb.ListModelVersionsResponse:
        return await self._unary("ListModelVersions", pb.ListModelVersionsRequest(
            name=name, stage=stage_value(stage),
            order_by=order_by, page_size=page_size, page_token=page_token), token, pb.ListModelVersionsResponse)

    async def compare(self, token: str | None, name: str, versions: Sequence[int],
                      metric: str = "") -> pb.CompareModelVersionsResponse:
        return await self._unary("CompareModelVersions", pb.CompareModelVersionsRequest(
            name=name, versions=list(versions), metric=metric), token, pb.CompareModelVersionsResponse)

    async def history(self, token: str | None, name: str, metric: str = "") -> pb.GetModelHistoryResponse:
        return await self._unary("GetModelHistory", pb.GetModelHistoryRequest(name=name, metric=metric), token,
                                 pb.GetModelHistoryResponse)

    async def audit_events(self, token: str | None, *, model_name: str = "", actor: str = "", page_size: int = 50,
                           page_token: str = "") -> pb.ListAuditEventsResponse:
        return await self._unary("ListAuditEvents", pb.ListAuditEventsRequest(
            model_name=model_name, actor=actor, page_size=page_size, page_token=page_token), token,
            pb.ListAuditEventsResponse)

    async def get_job(self, token: str | None, job_id: str) -> pb.RetrainJob:
        reply: pb.GetRetrainJobResponse = await self._unary("GetRetrainJob", pb.GetRetrainJobRequest(job_id=job_id),
                                                            token, pb.GetRetrainJobResponse)
        return reply.job

    async def list_jobs(self, token: str | None, *, model_name: str = "", page_size: int = 20,
                        page_token: str = "") -> pb.ListRetrainJobsResponse:
        return await self._unary("ListRetrainJobs", pb.ListRetrainJobsRequest(
            model_name=model_name, page_size=page_size, page_token=page_token), token, pb.ListRetrainJobsResponse)

    # ---- changes ----

    async def promote(self, token: str | None, name: str, version: int, stage: str, *,
                      expected_current_version: int | None, reason: str = "") -> pb.PromoteModelVersionResponse:
        request = pb.PromoteModelVersionRequest(name=name, version=version,
                                                stage=stage_value(stage),
                                                request_id=uuid.uuid4().hex, reason=reason)
        if expected_current_version is not None:
            request.expected_current_version = expected_current_version
        return await self._unary("PromoteModelVersion", request, token, pb.PromoteModelVersionResponse)

    async def rollback(self, token: str | None, name: str, *, expected_current_version: int,
                       reason: str = "") -> pb.RollbackModelResponse:
        return await self._unary("RollbackModel", pb.RollbackModelRequest(
            name=name, expected_current_version=expected_current_version, request_id=uuid.uuid4().hex,
            reason=reason), token, pb.RollbackModelResponse)

    async def cleanup(self, token: str | None, name: str, *, keep_last: int = 0, versions: Sequence[int] = (),
                      dry_run: bool) -> pb.CleanupModelVersionsResponse:
        return await self._unary("CleanupModelVersions", pb.CleanupModelVersionsRequest(
            name=name, keep_last=keep_last, versions=list(versions), dry_run=dry_run,
            request_id="" if dry_run else uuid.uuid4().hex), token, pb.CleanupModelVersionsResponse)

    async def cancel_job(self, token: str | None, job_id: str, reason: str = "") -> pb.RetrainJob:
        reply: pb.CancelRetrainJobResponse = await self._unary(
            "CancelRetrainJob", pb.CancelRetrainJobRequest(job_id=job_id, reason=reason), token, pb.CancelRetrainJobResponse)
        return reply.job

    async def start_retrain(self, token: str | None, model_types: Sequence[str], *, dataset: str = "",
                            max_epochs: int = 0, auto_promote: bool = False) -> list[str]:
        """Starts one job per model type and returns their ids (the jobs go on without this stream)."""
        request = pb.RetrainRequest(model_types=[model_type_value(t) for t in model_types],
                                    dataset=wpb.DatasetSpec(spec=dataset), auto_promote=auto_promote,
                                    params=wpb.TrainParams(max_epochs=max_epochs), request_id=uuid.uuid4().hex)
        wanted = len(request.model_types) or len(wpb.ModelType.keys()) - 1
        jobs: list[str] = []
        async for ev in self._stream("Retrain", request, token):
            if ev.job_id not in jobs:
                jobs.append(ev.job_id)
            if len(jobs) >= wanted:
                break
        return jobs

    # ---- streams ----

    def watch_job(self, token: str | None, job_id: str, after_sequence: int = 0) -> AsyncIterator[pb.RetrainEvent]:
        return self._stream("WatchRetrainJob", pb.WatchRetrainJobRequest(job_id=job_id,
                                                                         after_sequence=after_sequence), token)

    def watch_alerts(self, token: str | None) -> AsyncIterator[pb.Alert]:
        return self._stream("WatchAlerts", pb.WatchAlertsRequest(), token)
