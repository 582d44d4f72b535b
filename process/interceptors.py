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

from aqimodels.client.domain import Caller
from aqimodels.client.errors import AqiModelsError, InvalidArgumentError, bound, status_code_for
from aqimodels.process import deadlines

log = structlog.get_logger(__name__)

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("aqimodels_request_id", default="")
_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("aqimodels_caller", default=None)

# (method full name, invocation metadata) -> caller identity; raises UnauthenticatedError etc.
Authenticator = Callable[[str, dict[str, str]], Caller]
Observer = Callable[[str, str, float], None]  # (rpc, code name, seconds)
# (caller, rpc, message): a request refused at the edge (bytes that are not its message, a string over its cap)
Rejecter = Callable[[Caller | None, str, str], None]

# Every status message is bounded: a message quoting a huge input would pass gRPC's metadata limit
# (RESOURCE_EXHAUSTED in Python, a hung call in grpc-js). Inputs are quoted with errors.quote.
MAX_MESSAGE_CHARS = 1000
# Caps on the request's string fields at the edge: names and identifiers 256 characters, free text
# (reasons, dataset specs, descriptions, page tokens) 4096, anything else 1024.
NAME_CHARS = 256
TEXT_CHARS = 4096
OTHER_CHARS = 1024
_TEXT_FIELDS = frozenset({"reason", "spec", "description", "message", "page_token", "dataset", "model_uri",
                          "source"})
_OTHER_FIELDS = frozenset({"extra", "tags"})  # map values


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


def current_caller() -> Caller | None:
    return _caller.get()


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class ServerInterceptor(grpc.ServerInterceptor):
    """Wraps every unary and server-streaming handler."""

    def __init__(self, authenticate: Authenticator | None = None, observe: Observer | None = None,
                 reject: Rejecter | None = None) -> None:
        self._authenticate = authenticate
        self._observe = observe
        self._reject = reject
        # grpc asks for the handler on every call: the wrapped one is built once per method.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        kept = self._wrapped.get(method)
        if kept is None or kept[0] is not handler:
            kept = (handler, self._wrap(handler, method))
            self._wrapped[method] = kept
        return kept[1]

    def _wrap(self, handler: Any, method: str) -> Any:
        """The handler with the request's bytes parsed inside it (grpc gets no deserializer).

        grpc's own deserialisation runs before any interceptor code and answers a failure with
        INTERNAL "Exception deserializing request!" and a traceback in the log. Parsed here, after
        authentication, bytes that are not the request message answer INVALID_ARGUMENT.
        """
        rpc = method.rsplit("/", 1)[-1]
        if method.startswith("/grpc."):  # health and reflection: only the parse moves in, nothing else
            return _parsing_only(handler, method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, rpc, handler.request_deserializer),
                request_deserializer=None,
                response_serializer=_passing_wire(handler.response_serializer))
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, rpc, handler.request_deserializer),
                request_deserializer=None,
                response_serializer=handler.response_serializer)
        return handler

    def _parse(self, raw: Any, deserialize: Callable[[bytes], Any] | None, rpc: str) -> Any:
        """The request message of ``raw`` bytes, its strings within their caps; else InvalidArgumentError."""
        if deserialize is None or not isinstance(raw, bytes):
            return raw
        try:
            request = deserialize(raw)
        except Exception:  # noqa: BLE001 - DecodeError, or anything else a hostile body makes the parser raise
            error = InvalidArgumentError(f"request is not a valid {_message_name(deserialize, rpc)}",
                                         field="request")
        else:
            problem = check_string_caps(request)
            if problem is None:
                return request
            error = InvalidArgumentError(problem[1], field=problem[0])
        if self._reject is not None:
            try:
                self._reject(current_caller(), rpc, error.message)
            except Exception:  # a failed audit write must not turn INVALID_ARGUMENT into INTERNAL
                log.exception("rejection_not_audited", rpc=rpc)
        raise error

    def _begin(self, context: grpc.ServicerContext, method: str, rpc: str) -> None:
        md = _metadata(context)
        request_id = (md.get("x-request-id") or "")[:128] or _new_request_id()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id, rpc=rpc)
        _request_id.set(request_id)
        _caller.set(None)
        # The call's budget, for every wait it makes (process/deadlines.py); none beyond a year.
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
            message = bound(exc.message, MAX_MESSAGE_CHARS)
        else:
            log.exception("rpc_failed_unexpectedly", rpc=rpc)
            code = grpc.StatusCode.INTERNAL
            message = f"internal error (request id {current_request_id()}); the server logged the details"
        context.abort(code, message)
        return code  # not reached: abort raises

    def _finish(self, rpc: str, code: grpc.StatusCode, start: float) -> None:
        duration = time.perf_counter() - start
        # A registry probes its workers every few seconds: a healthy probe is routine (debug), a
        # failing one is news (info).
        emit = log.debug if rpc in _PROBE_RPCS and code == grpc.StatusCode.OK else log.info
        emit("rpc_finished", code=code.name, duration_ms=round(duration * 1000, 2))
        if self._observe is not None:
            self._observe(rpc, code.name, duration)

    def _wrap_unary(self, fn: Any, method: str, rpc: str, deserialize: Any = None) -> Any:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                self._begin(context, method, rpc)
                return fn(self._parse(request, deserialize, rpc), context)
            except Exception as exc:
                code, aborted = _error_code(context, exc)
                if aborted:  # context.abort: its exception passes through
                    raise
                self._fail(context, exc, rpc)
            finally:
                self._finish(rpc, code, start)

        return handler

    def _wrap_stream(self, fn: Any, method: str, rpc: str, deserialize: Any = None) -> Any:
        def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                self._begin(context, method, rpc)
                yield from fn(self._parse(request, deserialize, rpc), context)
            except GeneratorExit:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code, aborted = _error_code(context, exc)
                if aborted:  # context.abort: its exception passes through
                    raise
                self._fail(context, exc, rpc)
            finally:
                if code == grpc.StatusCode.OK and not context.is_active():
                    code = grpc.StatusCode.CANCELLED
                self._finish(rpc, code, start)

        return handler


def _error_code(context: grpc.ServicerContext, exc: Exception) -> tuple[grpc.StatusCode, bool]:
    """The code a failed call ends with, and whether the handler set it itself (context.abort)."""
    aborted = _set_code(context)
    if aborted not in (None, grpc.StatusCode.OK):
        return aborted, True
    return (status_code_for(exc) if isinstance(exc, AqiModelsError) else grpc.StatusCode.INTERNAL), False


def _set_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The code the handler set on its context (context.abort sets one), None when it set none."""
    try:
        code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]  # grpc has had it since 1.38, types-grpcio lacks it
    except (AttributeError, NotImplementedError):  # a context that does not track its code
        return None
    return code


_PROBE_RPCS = frozenset({"GetWorkerInfo", "Check"})


def _message_name(deserialize: Callable[[bytes], Any], rpc: str) -> str:
    cls = getattr(deserialize, "__self__", None)
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return str(getattr(descriptor, "name", "") or f"{rpc}Request")


def check_string_caps(message: Any, prefix: str = "") -> tuple[str, str] | None:
    """The first string field over its cap as (field path, message), or None; walks nested messages and maps."""
    for field, value in message.ListFields():
        path = prefix + field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key in value:
                if isinstance(key, str) and len(key) > NAME_CHARS:
                    return path, f"{path} has a key longer than {NAME_CHARS} characters"
                item = value[key]
                if isinstance(item, str):
                    limit = TEXT_CHARS if field.name in _OTHER_FIELDS | _TEXT_FIELDS else OTHER_CHARS
                    if len(item) > limit:
                        return f"{path}[{key[:40]}]", f"{path}[{key[:40]}] is longer than {limit} characters"
                elif value_field.message_type is not None:
                    found = check_string_caps(item, f"{path}[{str(key)[:40]}].")
                    if found is not None:
                        return found
            continue
        items = value if field.is_repeated else [value]
        if field.type == field.TYPE_STRING:
            limit = TEXT_CHARS if field.name in _TEXT_FIELDS else NAME_CHARS
            for item in items:
                if len(item) > limit:
                    return path, f"{path} is longer than {limit} characters"
        elif field.message_type is not None:
            for item in items:
                found = check_string_caps(item, path + ".")
                if found is not None:
                    return found
    return None


def _parsing_only(handler: Any, method: str) -> Any:
    """A health or reflection handler whose request is parsed inside it: bad bytes answer INVALID_ARGUMENT."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler
    name = _message_name(deserialize, method.rsplit("/", 1)[-1])

    def parse(raw: Any, context: grpc.ServicerContext) -> Any:
        try:
            return deserialize(raw)
        except Exception:  # noqa: BLE001 - any parser failure is the caller's bytes
            log.info("rpc_finished", rpc=method.rsplit("/", 1)[-1], code="INVALID_ARGUMENT",
                     reason=f"request is not a valid {name}")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {name}")

    if handler.unary_unary:
        fn = handler.unary_unary
        return grpc.unary_unary_rpc_method_handler(lambda raw, ctx: fn(parse(raw, ctx), ctx),
                                                   request_deserializer=None,
                                                   response_serializer=handler.response_serializer)
    if handler.unary_stream:
        fn_s = handler.unary_stream

        if getattr(fn_s, "experimental_non_blocking", False):  # health's Watch answers through a callback
            def stream(raw: Any, ctx: grpc.ServicerContext, send_response_callback: Any = None) -> Any:
                return fn_s(parse(raw, ctx), ctx, send_response_callback)

            stream.experimental_non_blocking = True  # type: ignore[attr-defined]  # grpc reads these attributes off the handler function
            stream.experimental_thread_pool = getattr(fn_s, "experimental_thread_pool", None)  # type: ignore[attr-defined]  # grpc reads these attributes off the handler function
        else:
            def stream(raw: Any, ctx: grpc.ServicerContext, send_response_callback: Any = None) -> Any:
                yield from fn_s(parse(raw, ctx), ctx)

        return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=None,
                                                    response_serializer=handler.response_serializer)
    return handler  # reflection is a bidirectional stream: its messages are parsed by grpc per message
