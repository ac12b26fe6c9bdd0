"""A locust User that speaks gRPC, the way locust documents it (examples/grpc/grpc_user.py).

The stubs are the plain synchronous ones made cooperative by gevent
(``grpc.experimental.gevent.init_gevent()``): grpc.aio does not mix with locust's gevent
workers. An interceptor on the channel fires ``events.request`` for every call, with
request_type ``grpc``, the method's short name, the response time in milliseconds and the
RpcError, if any, as the exception.
"""
from __future__ import annotations

import time
from typing import Callable

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User
from locust.exception import LocustError

from reservd.v1 import reservd_pb2_grpc as pb_grpc

# Must run before the first channel exists: grpc's completion queue then yields to gevent.
grpc_gevent.init_gevent()

# A call that outlives this is a failure for locust and an unknown outcome for the caller.
CALL_TIMEOUT_SECONDS = 10.0


def method_name(method: str | bytes) -> str:
    """'/reservd.v1.Reservations/Reserve' -> 'Reserve'."""
    if isinstance(method, bytes):
        method = method.decode()
    return method.rsplit("/", 1)[-1]


class _TimedStream:
    """A server stream that reports once to locust: when its first message arrives (the
    response time is the time to first message), or when it fails. A cancel that the user
    asked for is not a failure."""

    def __init__(self, call, report: Callable, name: str, started: float) -> None:
        self._call = call
        self._report = report
        self._name = name
        self._started = started
        self._first = True
        self._cancelled = False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            message = next(self._call)
        except StopIteration:
            raise
        except grpc.RpcError as error:
            if not (self._cancelled and error.code() == grpc.StatusCode.CANCELLED):
                self._report(self._name, self._started, 0, error)
            raise
        if self._first:
            self._first = False
            self._report(self._name, self._started, message.ByteSize(), None)
        return message

    def cancel(self) -> bool:
        self._cancelled = True
        return self._call.cancel()

    def __getattr__(self, attribute):
        return getattr(self._call, attribute)


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Fires ``events.request`` per call. ``rename(name, response)`` may give a successful
    answer a more telling name (e.g. 'Reserve (sold out)'), so that business outcomes that are
    successes still get their own row in locust's statistics."""

    def __init__(self, environment, rename: Callable | None = None) -> None:
        self.environment = environment
        self.rename = rename

    def _report(self, name: str, started: float, length: int, exception, response=None):
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            response=response,
            context={},
            exception=exception,
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        name = method_name(client_call_details.method)
        started = time.perf_counter()
        call = continuation(client_call_details, request)
        try:
            response = call.result()
        except grpc.RpcError as error:
            self._report(name, started, 0, error)
        else:
            if self.rename is not None:
                name = self.rename(name, response)
            self._report(name, started, response.ByteSize(), None, response)
        return call

    def intercept_unary_stream(self, continuation, client_call_details, request):
        started = time.perf_counter()
        call = continuation(client_call_details, request)
        return _TimedStream(call, self._report, method_name(client_call_details.method), started)


class GrpcUser(User):
    """Base for reservd users: ``self.reservations`` and ``self.admin`` are stubs on one
    intercepted channel to ``host`` ('127.0.0.1:50051', no scheme)."""

    abstract = True
    rename: Callable | None = None

    def __init__(self, environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise LocustError("give the reservd address with --host 127.0.0.1:PORT")
        target = self.host.removeprefix("http://").removeprefix("grpc://")
        self._raw_channel = grpc.insecure_channel(target)
        channel = grpc.intercept_channel(
            self._raw_channel, LocustInterceptor(environment, type(self).rename)
        )
        self.reservations = pb_grpc.ReservationsStub(channel)
        self.admin = pb_grpc.AdminStub(channel)

    def on_stop(self) -> None:
        self._raw_channel.close()
