"""The server interceptor shared by the registry and the worker: request ids, logging, errors.

It binds ``request_id`` and ``rpc`` into structlog's context vars, echoes ``x-request-id`` in
the trailing metadata, turns domain errors into their status codes through the one table in
``aqimodels.client.errors`` (anything else is a bug: INTERNAL with a generic message, the
traceback logged), and logs one ``rpc_finished`` event per call with ``code`` and
``duration_ms``. It holds no MLflow import so the training worker reuses it.
"""

from __future__ import annotations

import contextvars
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import grpc
import structlog

from aqimodels.client.errors import AqiModelsError, status_code_for
from aqimodels.server import deadlines

log = structlog.get_logger(__name__)

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("aqimodels_request_id", default="")
_caller: contextvars.ContextVar[Any] = contextvars.ContextVar("aqimodels_caller", default=None)

# (method full name, invocation metadata) -> caller identity; raises UnauthenticatedError etc.
Authenticator = Callable[[str, dict[str, str]], Any]
Observer = Callable[[str, str, float], None]  # (rpc, code name, seconds)


class Wire:
    """A response already in protobuf wire format: sent as it is, without a parse and a re-serialise.

    The registry's hot reads (GetStatus, ListModelVersions, CompareModelVersions) are written
    around bytes kept in the read model; handing grpc a message would cost a parse of them and a
    serialisation back, the larger part of a 1,000-version comparison. (A holder, not a bytes
    subclass: grpc's send operation takes exact bytes.)
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _passing_wire(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    if serialize is None:
        return None

    def serializer(response: Any) -> bytes:
        return response.data if response.__class__ is Wire else serialize(response)

    return serializer


_ID_PREFIX = uuid.uuid4().hex[:16]  # per process
_id_counter = itertools.count(1)


def _new_request_id() -> str:
    """32 hex digits, unique: a random per-process prefix and a counter (uuid4 costs a syscall per call)."""
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def current_request_id() -> str:
    return _request_id.get()


def current_caller() -> Any:
    return _caller.get()


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class ServerInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Wraps every unary and server-streaming handler."""

    def __init__(self, authenticate: Authenticator | None = None, observe: Observer | None = None) -> None:
        self._authenticate = authenticate
        self._observe = observe
        # grpc asks for the handler on every call: the wrapped one is built once per method.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        if method.startswith("/grpc."):  # health and reflection pass through untouched
            return handler
        kept = self._wrapped.get(method)
        if kept is None or kept[0] is not handler:
            kept = (handler, self._wrap(handler, method))
            self._wrapped[method] = kept
        return kept[1]

    def _wrap(self, handler: Any, method: str) -> Any:
        rpc = method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, rpc),
                request_deserializer=handler.request_deserializer,
                response_serializer=_passing_wire(handler.response_serializer))
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, rpc),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _begin(self, context: grpc.ServicerContext, method: str, rpc: str) -> None:
        md = _metadata(context)
        request_id = (md.get("x-request-id") or "")[:128] or _new_request_id()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id, rpc=rpc)
        _request_id.set(request_id)
        _caller.set(None)
        # The call's budget, for every wait it makes (server/deadlines.py); none beyond a year.
        left = context.time_remaining()
        deadlines.set_current(deadlines.Deadline.after(left if left is not None and left < 3e7 else None,
                                                       context.is_active))
        context.set_trailing_metadata((("x-request-id", request_id),))
        if self._authenticate is not None:
            caller = self._authenticate(method, md)
            _caller.set(caller)
            # Who the registry took the caller for: a dashboard shows each user what their role allows.
            context.set_trailing_metadata((("x-request-id", request_id),
                                           ("x-aqimodels-caller", quote(str(caller.name), safe="")),
                                           ("x-aqimodels-role", str(caller.role))))

    def _fail(self, context: grpc.ServicerContext, exc: BaseException, rpc: str) -> grpc.StatusCode:
        code = status_code_for(exc)
        if isinstance(exc, AqiModelsError) and code != grpc.StatusCode.INTERNAL:
            message = exc.message
        else:
            log.exception("rpc_failed_unexpectedly", rpc=rpc)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error (request id {current_request_id()}); the server logged the details"
        context.abort(code, message)
        return code  # not reached: abort raises

    def _finish(self, rpc: str, code: grpc.StatusCode, start: float) -> None:
        duration = time.perf_counter() - start
        log.info("rpc_finished", code=code.name, duration_ms=round(duration * 1000, 2))
        if self._observe is not None:
            self._observe(rpc, code.name, duration)

    def _wrap_unary(self, fn: Any, method: str, rpc: str) -> Any:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                self._begin(context, method, rpc)
                return fn(request, context)
            except Exception as exc:
                code = status_code_for(exc) if isinstance(exc, AqiModelsError) else grpc.StatusCode.INTERNAL
                if _aborted(context):
                    code = context.code() or code
                    raise
                self._fail(context, exc, rpc)
            finally:
                self._finish(rpc, code, start)

        return handler

    def _wrap_stream(self, fn: Any, method: str, rpc: str) -> Any:
        def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                self._begin(context, method, rpc)
                yield from fn(request, context)
            except GeneratorExit:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code = status_code_for(exc) if isinstance(exc, AqiModelsError) else grpc.StatusCode.INTERNAL
                if _aborted(context):
                    code = context.code() or code
                    raise
                self._fail(context, exc, rpc)
            finally:
                if code == grpc.StatusCode.OK and not context.is_active():
                    code = grpc.StatusCode.CANCELLED
                self._finish(rpc, code, start)

        return handler


def _aborted(context: grpc.ServicerContext) -> bool:
    """True when the handler already called context.abort (its exception must pass through)."""
    try:
        return context.code() not in (None, grpc.StatusCode.OK)
    except Exception:
        return False
