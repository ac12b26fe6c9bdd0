"""No request can produce UNKNOWN: undecodable bodies answer INVALID_ARGUMENT naming the field,
look-alike identifiers are refused, and an unexpected exception is a bug that closes the daemon."""
from __future__ import annotations

import logging

import grpc
import pytest
from conftest import aio, cart, running
from google.protobuf.descriptor import FieldDescriptor

from reservd import wire
from reservd.v1 import reservd_pb2 as pb


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


BAD_UTF8 = b"ok\xc3\x28"


def _bad_utf8_bodies(descriptor, prefix=""):
    """(field path, body) for every string field, at every depth: one invalid UTF-8 value."""
    for field in descriptor.fields:
        index = "[0]" if field.is_repeated else ""
        path = f"{prefix}{field.name}{index}"
        if field.type == FieldDescriptor.TYPE_STRING:
            yield path, _field(field.number, BAD_UTF8)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for inner, body in _bad_utf8_bodies(field.message_type, path + "."):
                yield inner, _field(field.number, body)


# (what, body, words the answer must contain)
MALFORMED = [
    ("truncated length", _field(1, b"abc")[:-1], "runs past the end"),
    ("field number 0", _varint(0 << 3 | 0) + b"\x01", "field number 0"),
    ("wire type 7", _varint(1 << 3 | 7) + b"\x01", "wire type 7"),
    ("11-byte varint", _varint(9 << 3 | 0) + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
    ("stray end-group", _varint(9 << 3 | 4), "end-group"),
    ("truncated varint", _varint(9 << 3 | 0) + b"\xff", "truncated varint"),
]


def _methods():
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            yield service, method


async def _raw_call(channel: grpc.aio.Channel, service, method, body: bytes):
    path = f"/{service.full_name}/{method.name}"
    if method.server_streaming:
        call = channel.unary_stream(path)(body, timeout=10)
        return [item async for item in call]
    return await channel.unary_unary(path)(body, timeout=10)


# Requests whose only fields are numbers: no string to send invalid UTF-8 in.
_NO_STRINGS = {"WatchAlerts", "GetAudit"}


def test_every_request_has_a_string_field_case():
    for _, method in _methods():
        if method.name in _NO_STRINGS:
            assert not any(_bad_utf8_bodies(method.input_type)), method.name
            continue
        assert any(_bad_utf8_bodies(method.input_type)), method.name


@aio
async def test_undecodable_bodies_answer_invalid_argument_naming_the_field(caplog):
    caplog.set_level(logging.WARNING)
    async with running() as server:
        await server.set_stock("ok", 5)
        seq_before = server.daemon.ledger.seq
        checked = 0
        for service, method in _methods():
            if method.client_streaming:
                continue
            cases = [
                (path, body, f"{path}: not valid UTF-8")
                for path, body in _bad_utf8_bodies(method.input_type)
            ] + MALFORMED
            for what, body, words in cases:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _raw_call(server.channel, service, method, body)
                error = caught.value
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                    method.name, what, error.code(), error.details()
                )
                assert words in error.details(), (method.name, what, error.details())
                checked += 1
        assert checked >= 70
        assert server.daemon.ledger.seq == seq_before, "bad bodies changed nothing"
        assert (await server.stock("ok")).available == 5
        assert server.daemon.guard.grant_reason is None
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


def test_describe_names_nested_fields():
    body = _field(1, b"r") + _field(2, _field(1, b"a") + _varint(2 << 3) + b"\x01") + _field(
        2, _field(1, BAD_UTF8)
    )
    assert wire.describe(pb.ReserveRequest.DESCRIPTOR, body) == (
        "lines[1].sku: not valid UTF-8 (byte 2)"
    )
    with pytest.raises(Exception):
        pb.ReserveRequest.FromString(body)


LOOK_ALIKES = [
    ("trailing space", "sku-1 ", "white space"),
    ("leading space", " sku-1", "white space"),
    ("no-break space", "sku-1\u00a0", "printable"),
    ("decomposed", "cafe\u0301", "NFC"),
]


@aio
async def test_look_alike_skus_are_refused():
    async with running() as server:
        await server.set_stock("caf\u00e9", 2)  # composed: NFC, accepted
        seq_before = server.daemon.ledger.seq
        for what, sku, words in LOOK_ALIKES:
            for call in (
                server.admin.SetStock(pb.SetStockRequest(sku=sku, on_hand=1, adjustment_id="a")),
                server.reservations.Reserve(cart("r", (sku, 1))),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
                assert words in caught.value.details(), (what, caught.value.details())
        assert server.daemon.ledger.seq == seq_before
        assert (await server.stock("caf\u00e9")).available == 2


@aio
async def test_extend_ttl_zero_and_the_error_text_agree():
    async with running() as server:
        await server.set_stock("a", 1)
        await server.reservations.Reserve(cart("r", ("a", 1)))
        for ttl in (0, -1):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await server.reservations.Extend(pb.ExtendRequest(reservation_id="r", ttl_seconds=ttl))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == (
                f"ttl_seconds: must be between 1 and 86400 seconds, not {ttl}"
            )


@aio
async def test_unknown_skus_are_not_found_naming_the_field():
    async with running() as server:
        await server.set_stock("a", 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.reservations.GetStock(pb.GetStockRequest(skus=["a", "nope"]))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details().startswith("skus[1]: ")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in server.reservations.WatchStock(pb.WatchStockRequest(skus=["nope"])):
                pass
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details().startswith("skus[0]: ")


class _BrokenTable:
    """Wraps the daemon's table; its commit breaks an invariant as a bug would."""

    def __init__(self, table) -> None:
        self._table = table

    def __getattr__(self, name):
        return getattr(self._table, name)

    def commit(self, *args):
        raise AssertionError("counters of SKU 'a' went negative: injected")


@aio
async def test_an_unexpected_exception_closes_the_daemon_instead_of_answering_unknown():
    async with running() as server:
        await server.set_stock("a", 5)
        await server.reservations.Reserve(cart("r1", ("a", 1)))
        server.daemon.ledger.table = _BrokenTable(server.daemon.ledger.table)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.reservations.Commit(pb.CommitRequest(reservation_id="r1"))
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "bug" in caught.value.details()
        assert server.daemon.guard.write_reason is not None
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.reservations.Reserve(cart("r2", ("a", 1)))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
