"""Registers the gRPC servicers so that no request can be answered UNKNOWN.

Two things grpc would otherwise turn into ``UNKNOWN: Unexpected ...`` plus a traceback per call:

- a body that does not parse (malformed protobuf, a string field that is not UTF-8): the method
  answers INVALID_ARGUMENT naming the field (:mod:`reservd.wire`), logs one line, changes nothing;
- an exception the method did not expect: that is a bug (a broken invariant in the ledger or the
  table), so ``on_bug`` is called — the daemon fails closed and exits — and the call is answered
  INTERNAL. Serving never goes on past a bug.

Handlers are built from the service descriptor, so a new RPC is covered without a line here.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from reservd import wire
from reservd.admission import Admission
from reservd.auth import Authorizer
from reservd.metrics import Metrics
from reservd.v1 import reservd_pb2 as pb

log = logging.getLogger("reservd.requests")

OnBug = Callable[[BaseException, str], None]

_OK = grpc.StatusCode.OK

# Undecodable bodies are logged at most this often (one line each); the rest only counted.
_UNDECODABLE_LOG_SECONDS_MIN = 1.0


class Undecodable:
    """Stands in for a request whose body did not parse; carries the one-line reason."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _UndecodableLog:
    def __init__(self) -> None:
        self.count = 0
        self._last = 0.0
        self._quiet = 0

    def note(self, method: str, reason: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last < _UNDECODABLE_LOG_SECONDS_MIN:
            self._quiet += 1
            return
        log.warning(
            "undecodable request",
            extra={"method": method, "why": reason, "not_logged_since_last": self._quiet},
        )
        self._last = now
        self._quiet = 0


undecodable = _UndecodableLog()


def _deserializer(message_class) -> Callable[[bytes], object]:
    parse = message_class.FromString
    descriptor = message_class.DESCRIPTOR

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError:
            return Undecodable(wire.describe(descriptor, data))

    return deserialize


async def _refuse(context, method: str, request: Undecodable) -> None:
    undecodable.note(method, request.reason)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)


async def _bug(context, method: str, error: Exception, on_bug: OnBug) -> None:
    on_bug(error, method)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"reservd hit a bug and is stopping ({type(error).__name__}); nothing of this call "
        "was acknowledged: retry with the same ids once it is back",
    )


async def _checked(requests, context, method: str):
    """A client stream's requests, refusing the call at the first undecodable one."""
    async for request in requests:
        if type(request) is Undecodable:
            await _refuse(context, method, request)
        yield request


class _Call:
    """One call's prelude and accounting, the same for every kind of handler."""

    __slots__ = ("started", "code", "admission", "key")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.code = _OK
        self.admission: Admission | None = None
        self.key = None

    async def enter(self, request, context, method: str, check, admission, streaming: bool,
                    client_streaming: bool):
        """Authorisation, then admission, then the body: the request the servicer gets.
        An unauthorised caller is refused before it can take a slot of anyone's admission."""
        if check is not None:
            await check(context)
        if admission is not None:
            self.key = await admission.enter(context, streaming)
            self.admission = admission
        if client_streaming:
            return _checked(request, context, method)
        if type(request) is Undecodable:
            await _refuse(context, method, request)
        return request

    def ended(self, context, error: BaseException) -> None:
        """The call ends by an abort or a cancellation: the code it is counted under."""
        if isinstance(error, grpc.aio.AbortError):
            self.code = context.code() or grpc.StatusCode.UNKNOWN
        else:
            self.code = grpc.StatusCode.CANCELLED

    def leave(self, rpc) -> None:
        if self.admission is not None:
            self.admission.leave(self.key)
        rpc.observe(self.code, time.perf_counter() - self.started)


def _unary_response(
    method: str, behaviour, on_bug: OnBug, client_streaming: bool, check, rpc, admission
):
    async def handle(request, context):
        call = _Call()
        try:
            request = await call.enter(
                request, context, method, check, admission, False, client_streaming
            )
            try:
                return await behaviour(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                await _bug(context, method, error, on_bug)
        except (grpc.aio.AbortError, asyncio.CancelledError) as error:
            call.ended(context, error)
            raise
        finally:
            call.leave(rpc)

    return handle


def _stream_response(
    method: str, behaviour, on_bug: OnBug, client_streaming: bool, check, rpc, admission
):
    async def handle(request, context):
        call = _Call()
        try:
            request = await call.enter(
                request, context, method, check, admission, True, client_streaming
            )
            try:
                async for response in behaviour(request, context):
                    yield response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:
                await _bug(context, method, error, on_bug)
        except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit) as error:
            call.ended(context, error)
            raise
        finally:
            call.leave(rpc)

    return handle


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def register(
    server: grpc.aio.Server, service_name: str, servicer, on_bug: OnBug, *,
    authorizer: Authorizer | None = None, metrics: Metrics | None = None,
    admission: Admission | None = None,
) -> str:
    """Add ``servicer`` for the reservd.v1 service ``service_name`` (e.g. "Reservations") to
    ``server``; returns the service's full name. The servicer implements every method.

    With an ``authorizer``, each call is checked against the roles allowed that method before
    the servicer sees it. ``metrics`` gets the code and latency of each call (grpc-prometheus
    names), its labels bound here once per method. ``admission`` bounds calls in flight,
    streams and rates (RESOURCE_EXHAUSTED with a retry hint beyond them)."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    metrics = metrics or Metrics()
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        kind = (method.client_streaming, method.server_streaming)
        wrap = _stream_response if method.server_streaming else _unary_response
        check = authorizer.guard(service_name, method.name) if authorizer else None
        handlers[method.name] = _FACTORIES[kind](
            wrap(
                f"/{service.full_name}/{method.name}", getattr(servicer, method.name), on_bug,
                method.client_streaming, check,
                metrics.rpc(service.full_name, method.name, *kind), admission,
            ),
            request_deserializer=_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)
    return service.full_name
