"""TLS, mutual TLS, certificate rotation, roles and bearer tokens, against a real daemon with
real certificates made in the test."""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import re
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from conftest import aio, cart, running, test_config
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from certs import Authority
from reservd import auth, cli, records, wal
from reservd.config import ConfigError
from reservd.server import Daemon
from reservd.tls import channel_credentials
from reservd.v1 import reservd_pb2 as pb
from reservd.v1 import reservd_pb2_grpc as pb_grpc

TOKENS = {
    "shop": "checkout-token-0123456789",
    "feed": "sync-token-0123456789abc",
    "oncall": "ops-token-0123456789abcd",
    "root": "admin-token-0123456789ab",
}
ROLES = {"shop": ("checkout",), "feed": ("sync",), "oncall": ("ops",), "root": ("admin",)}


@pytest.fixture
def pki(tmp_path):
    ca = Authority(tmp_path)
    cert, key, _ = ca.server()
    return ca, cert, key


def mtls_config(pki, **overrides):
    ca, cert, key = pki
    return test_config(
        tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca.ca_file,
        tls_require_client_auth=True,
        auth_roles={"shop.example": ("checkout",), "feed.example": ("sync",),
                    "root.example": ("admin",)},
        **overrides,
    )


def secure_channel(target, ca, cert=None, key=None):
    return grpc.aio.secure_channel(target, channel_credentials(ca, cert, key))


def tokens_file(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text("".join(f'{name} = "{token}"\n' for name, token in TOKENS.items()))
    return path


@aio
async def test_mtls_client_certificate_maps_to_roles(pki):
    ca, _, _ = pki
    shop_cert, shop_key, _ = ca.issue("shop", "shop", dns=("shop.example",))
    async with running(mtls_config(pki)) as r:
        async with secure_channel(r.target, ca.ca_file, shop_cert, shop_key) as channel:
            admin = pb_grpc.AdminStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await admin.SetStock(pb.SetStockRequest(sku="a", on_hand=5, adjustment_id="x"))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "'shop.example'" in denied.value.details()
            assert "/reservd.v1.Admin/SetStock" in denied.value.details()
        root_cert, root_key, _ = ca.issue("root", "root.example")  # CN only, no SAN
        async with secure_channel(r.target, ca.ca_file, root_cert, root_key) as channel:
            await pb_grpc.AdminStub(channel).SetStock(
                pb.SetStockRequest(sku="a", on_hand=5, adjustment_id="x")
            )
        async with secure_channel(r.target, ca.ca_file, shop_cert, shop_key) as channel:
            response = await pb_grpc.ReservationsStub(channel).Reserve(cart("o1", ("a", 2)))
            assert response.granted


@aio
async def test_no_client_certificate_is_refused_at_the_handshake(pki):
    ca, _, _ = pki
    async with running(mtls_config(pki)) as r:
        async with secure_channel(r.target, ca.ca_file) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.ReservationsStub(channel).GetStock(
                    pb.GetStockRequest(skus=["a"]), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # Health stays open, but only over an authenticated connection.
        async with secure_channel(r.target, ca.ca_file) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )


@aio
async def test_a_certificate_from_another_ca_is_refused(pki, tmp_path):
    ca, _, _ = pki
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = Authority(other_dir, "other CA")
    cert, key, _ = other.issue("intruder", "root.example", dns=("root.example",))
    async with running(mtls_config(pki)) as r:
        async with secure_channel(r.target, ca.ca_file, cert, key) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.AdminStub(channel).SetStock(
                    pb.SetStockRequest(sku="a", on_hand=5, adjustment_id="x"), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert r.daemon.ledger.seq == 0


@aio
async def test_sync_identity_calling_set_stock_is_denied_and_changes_nothing(pki):
    ca, _, _ = pki
    root_cert, root_key, _ = ca.issue("root", "root.example")
    feed_cert, feed_key, _ = ca.issue("feed", "feed", uris=("spiffe://x/feed",), dns=("feed.example",))
    async with running(mtls_config(pki)) as r:
        async with secure_channel(r.target, ca.ca_file, root_cert, root_key) as channel:
            await pb_grpc.AdminStub(channel).SetStock(
                pb.SetStockRequest(sku="a", on_hand=5, adjustment_id="x")
            )
        seq = r.daemon.ledger.seq
        async with secure_channel(r.target, ca.ca_file, feed_cert, feed_key) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await pb_grpc.AdminStub(channel).SetStock(
                    pb.SetStockRequest(sku="a", on_hand=500, adjustment_id="y")
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "'feed.example'" in denied.value.details()
            stock = await pb_grpc.ReservationsStub(channel).GetStock(
                pb.GetStockRequest(skus=["a"])
            )
            assert stock.stock[0].on_hand == 5
        assert r.daemon.ledger.seq == seq


# Each method with a request that passes authorization; the answer after that does not matter.
REQUESTS = {
    ("Reservations", "Reserve"): cart("r1", ("a", 1)),
    ("Reservations", "Commit"): pb.CommitRequest(reservation_id="r1"),
    ("Reservations", "Extend"): pb.ExtendRequest(reservation_id="r1", ttl_seconds=10),
    ("Reservations", "Release"): pb.ReleaseRequest(reservation_id="r1"),
    ("Reservations", "Fulfil"): pb.FulfilRequest(reservation_id="r1"),
    ("Reservations", "GetReservation"): pb.GetReservationRequest(reservation_id="r1"),
    ("Reservations", "GetStock"): pb.GetStockRequest(skus=["a"]),
    ("Reservations", "WatchStock"): pb.WatchStockRequest(skus=["a"]),
    ("Reservations", "Batch"): pb.BatchRequest(
        ops=[pb.BatchOp(release=pb.ReleaseRequest(reservation_id="r1"))]
    ),
    ("Reservations", "BatchStream"): pb.BatchRequest(
        ops=[pb.BatchOp(release=pb.ReleaseRequest(reservation_id="r1"))]
    ),
    ("Reservations", "GetAts"): pb.GetAtsRequest(skus=["a"]),
    ("Reservations", "WatchAts"): pb.WatchAtsRequest(skus=["a"]),
    ("Reservations", "GetAlerts"): pb.GetAlertsRequest(),
    ("Reservations", "WatchAlerts"): pb.WatchAlertsRequest(),
    ("Admin", "SetStock"): pb.SetStockRequest(sku="a", on_hand=5, adjustment_id="s"),
    ("Admin", "AdjustStock"): pb.AdjustStockRequest(sku="a", delta=1, adjustment_id="d"),
    ("Admin", "SetChannel"): pb.SetChannelRequest(channel="amazon", change_id="c"),
    ("Admin", "ListChannels"): pb.ListChannelsRequest(),
    ("Admin", "SetSkuPolicy"): pb.SetSkuPolicyRequest(sku="a", channel="amazon", change_id="p"),
    ("Admin", "Allocate"): pb.AllocateRequest(
        sku="a", from_bucket="shared", to_bucket="pool", units=1, change_id="l"
    ),
    ("Admin", "GetBuckets"): pb.GetBucketsRequest(skus=["a"]),
    ("Admin", "ReceiveReturn"): pb.ReceiveReturnRequest(return_id="t", sku="a", units=1),
    ("Admin", "Inspect"): pb.InspectRequest(return_id="t", sellable_units=1),
    ("Admin", "WriteOff"): pb.WriteOffRequest(change_id="w", sku="a", units=1, state="damaged"),
    ("Admin", "HoldStock"): pb.HoldStockRequest(change_id="h", sku="a", units=1,
                                                state="safety_stock"),
    ("Admin", "ExpectReceipt"): pb.ExpectReceiptRequest(po_id="p", sku="a", units=1),
    ("Admin", "Receive"): pb.ReceiveRequest(receipt_id="c", po_id="p", units=1),
    ("Admin", "SetRulePolicy"): pb.SetRulePolicyRequest(channel="amazon", change_id="rp"),
    ("Admin", "GetVelocity"): pb.GetVelocityRequest(sku="a"),
    ("Admin", "SetPromotion"): pb.SetPromotionRequest(
        promotion_id="p", skus=["a"], channels=["amazon"], starts_at_ms=1, ends_at_ms=2),
    ("Admin", "ListPromotions"): pb.ListPromotionsRequest(),
    ("Admin", "SetReplenishment"): pb.SetReplenishmentRequest(sku="a", lead_time_days=7),
    ("Admin", "GetReplenishment"): pb.GetReplenishmentRequest(skus=["a"]),
    ("Admin", "GetAudit"): pb.GetAuditRequest(),
}
ALLOWED = {
    "checkout": {"Reserve", "Commit", "Extend", "Release", "Fulfil", "GetReservation", "GetStock",
                 "Batch", "BatchStream"},
    "sync": {"GetStock", "WatchStock", "GetAts", "WatchAts", "ListChannels"},
    "ops": {"GetReservation", "GetStock", "WatchStock", "GetAts", "WatchAts", "ListChannels",
            "GetBuckets", "GetVelocity", "ListPromotions", "GetAlerts", "WatchAlerts",
            "GetReplenishment", "GetAudit"},
    "admin": {method for _, method in REQUESTS},
}


def test_every_method_has_a_case():
    for service in ("Reservations", "Admin"):
        for method in pb.DESCRIPTOR.services_by_name[service].methods:
            assert (service, method.name) in REQUESTS, method.name


async def _call(channel, service, method, request, metadata):
    stub = getattr(pb_grpc, f"{service}Stub")(channel)
    if method == "BatchStream":
        request = iter([request])
    call = getattr(stub, method)(request, metadata=metadata, timeout=5)
    try:
        if method in ("WatchStock", "WatchAts", "WatchAlerts", "BatchStream"):
            async for _ in call:
                call.cancel()
                break
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@aio
async def test_each_role_may_call_its_methods_and_nothing_else(tmp_path):
    config = test_config(auth_roles=ROLES, auth_tokens_file=tokens_file(tmp_path))
    async with running(config) as r:
        # One alert (a SKU at 1 unit) for WatchAlerts to send at once when it is allowed.
        await r.admin.SetStock(
            pb.SetStockRequest(sku="low", on_hand=1, adjustment_id="low"),
            metadata=(("authorization", f"Bearer {TOKENS['root']}"),),
        )
        for identity, (role,) in ROLES.items():
            metadata = (("authorization", f"Bearer {TOKENS[identity]}"),)
            for (service, method), request in REQUESTS.items():
                if method == "Reserve":
                    await r.admin.SetStock(
                        pb.SetStockRequest(sku="a", on_hand=100, adjustment_id="restock"),
                        metadata=(("authorization", f"Bearer {TOKENS['root']}"),),
                    )
                code = await _call(r.channel, service, method, request, metadata)
                if method in ALLOWED[role]:
                    assert code != grpc.StatusCode.PERMISSION_DENIED, (role, method)
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (role, method, code)


@aio
async def test_a_wrong_or_missing_token_is_unauthenticated(tmp_path):
    config = test_config(auth_roles=ROLES, auth_tokens_file=tokens_file(tmp_path))
    async with running(config) as r:
        for metadata in (None, (("authorization", "Bearer " + "x" * 24),),
                         (("authorization", "Basic abc"),)):
            code = await _call(r.channel, "Reservations", "GetStock",
                               pb.GetStockRequest(skus=["a"]), metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED
        # Health and reflection stay open.
        response = await health_pb2_grpc.HealthStub(r.channel).Check(
            health_pb2.HealthCheckRequest()
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_token_comparison():
    authorizer = auth.Authorizer(ROLES, TOKENS)
    for identity, token in TOKENS.items():
        assert authorizer._token_identity(token) == identity
    assert authorizer._token_identity(TOKENS["root"][:-1]) is None
    assert authorizer._token_identity(TOKENS["root"] + "b") is None
    assert authorizer._token_identity("") is None
    with pytest.raises(ConfigError, match="auth_roles.x: unknown role 'boss'"):
        auth.Authorizer({"x": ("boss",)})


def test_loopback():
    for bind in ("127.0.0.1:1", "localhost:1", "[::1]:1", "127.0.0.2:5"):
        assert auth.is_loopback(bind), bind
    for bind in ("0.0.0.0:1", "[::]:1", "10.0.0.1:1", "example.com:1"):
        assert not auth.is_loopback(bind), bind


@aio
async def test_a_non_loopback_bind_without_tls_refuses_to_start(tmp_path):
    daemon = Daemon(test_config(tmp_path / "data", bind="0.0.0.0:0"))
    with pytest.raises(ConfigError, match="bind: 0.0.0.0:0 is not loopback"):
        await daemon.start()
    # Refused before the data directory was touched.
    assert not any((tmp_path / "data").glob("wal-*"))


def _served_serial(port, ca, cert, key) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as wrapped:
            return x509.load_der_x509_certificate(wrapped.getpeercert(binary_form=True)).serial_number


@aio
async def test_certificate_rotation_under_load_fails_no_call(pki):
    ca, cert_file, key_file = pki
    shop_cert, shop_key, _ = ca.issue("shop", "shop", dns=("shop.example",))
    config = mtls_config(pki, tls_reload_seconds=0.0)
    async with running(config) as r:
        r.daemon.ledger.set_stock("s", "a", 5, None, "test")
        loop = asyncio.get_running_loop()
        before = await loop.run_in_executor(
            None, _served_serial, r.daemon.port, ca.ca_file, shop_cert, shop_key
        )
        stop = asyncio.Event()
        calls = []
        failures = []

        async def persistent():
            async with secure_channel(r.target, ca.ca_file, shop_cert, shop_key) as channel:
                stub = pb_grpc.ReservationsStub(channel)
                while not stop.is_set() and len(calls) < 20_000:
                    try:
                        await stub.GetStock(pb.GetStockRequest(skus=["a"]), timeout=10)
                        calls.append(1)
                    except grpc.aio.AioRpcError as error:
                        failures.append(error.code())

        async def reconnecting():
            # A new channel per call: a handshake each, so the rotation lands among them.
            while not stop.is_set() and len(calls) < 20_000:
                async with secure_channel(r.target, ca.ca_file, shop_cert, shop_key) as channel:
                    try:
                        await pb_grpc.ReservationsStub(channel).GetStock(
                            pb.GetStockRequest(skus=["a"]), timeout=10
                        )
                        calls.append(1)
                    except grpc.aio.AioRpcError as error:
                        failures.append(error.code())

        workers = [asyncio.create_task(persistent()) for _ in range(4)]
        workers += [asyncio.create_task(reconnecting()) for _ in range(4)]
        deadline = time.monotonic() + 30
        while len(calls) < 50 and not failures and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        # Rotate as an operator would: write the new pair aside, then rename over the old one.
        new_cert, new_key, new_serial = ca.server("server-next")
        os.replace(new_key, key_file)
        os.replace(new_cert, cert_file)
        while r.daemon.tls_files.reloads < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        counted = len(calls)
        while len(calls) < counted + 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*workers)
        after = await loop.run_in_executor(
            None, _served_serial, r.daemon.port, ca.ca_file, shop_cert, shop_key
        )
    assert r.daemon.tls_files.reloads == 1
    assert after == new_serial != before
    assert failures == []
    assert len(calls) >= counted + 50


@aio
async def test_rpc_metrics_count_codes_per_method(tmp_path):
    config = test_config(
        tmp_path / "data", auth_roles=ROLES, auth_tokens_file=tokens_file(tmp_path),
        metrics_bind="127.0.0.1:0",
    )
    async with running(config) as r:
        await _call(r.channel, "Admin", "SetStock", REQUESTS["Admin", "SetStock"],
                    (("authorization", f"Bearer {TOKENS['root']}"),))
        await _call(r.channel, "Admin", "SetStock", REQUESTS["Admin", "SetStock"],
                    (("authorization", f"Bearer {TOKENS['feed']}"),))
        text = await asyncio.get_running_loop().run_in_executor(
            None, _metrics_text, r.daemon.metrics_port
        )
    labels = 'grpc_code="{}",grpc_method="SetStock",grpc_service="reservd.v1.Admin",grpc_type="unary"'
    assert f"grpc_server_handled_total{{{labels.format('OK')}}} 1.0" in text
    assert f"grpc_server_handled_total{{{labels.format('PERMISSION_DENIED')}}} 1.0" in text
    assert 'grpc_server_handling_seconds_count{grpc_method="SetStock"' in text
    assert "process_cpu_seconds_total" in text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    assert float(samples["reservd_wal_fsync_seconds_count"]) >= 1
    assert float(samples["reservd_wal_batch_records_sum"]) >= 1
    # Every series the Grafana dashboard plots exists (the mirror's only with a mirror).
    dashboard = (Path(__file__).parent.parent / "deploy" / "grafana-dashboard.json").read_text()
    names = set(re.findall(r"\b((?:reservd|grpc|process)_[a-z_]+)\{", dashboard))
    assert "grpc_server_handling_seconds_bucket" in names
    for name in names - {"reservd_mirror_sequence"}:
        assert f"\n{name}" in text, name


def _metrics_text(port):
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _bearer(identity):
    return (("authorization", f"Bearer {TOKENS[identity]}"),)


@aio
async def test_a_reservation_belongs_to_its_identity_across_a_restart(tmp_path, caplog):
    tokens = {**TOKENS, "till": "till-token-0123456789abcd"}
    path = tmp_path / "tokens.toml"
    path.write_text("".join(f'{name} = "{token}"\n' for name, token in tokens.items()))
    roles = {**ROLES, "till": ("checkout",)}
    config = test_config(tmp_path / "data", auth_roles=roles, auth_tokens_file=path)
    till = (("authorization", f"Bearer {tokens['till']}"),)
    caplog.set_level("INFO", logger="reservd.audit")
    async with running(config) as r:
        await r.admin.SetStock(
            pb.SetStockRequest(sku="a", on_hand=5, adjustment_id="s1"), metadata=_bearer("root")
        )
        reply = await r.reservations.Reserve(cart("mine", ("a", 2)), metadata=_bearer("shop"))
        assert reply.granted
    audit = [record for record in caplog.records if record.getMessage() == "stock changed"]
    assert [(a.identity, a.method, a.sku) for a in audit] == [("root", "SetStock", "a")]
    async with running(config) as r:  # replayed from the log: the owner is still recorded
        for method, request in (
            ("Commit", pb.CommitRequest(reservation_id="mine")),
            ("Extend", pb.ExtendRequest(reservation_id="mine", ttl_seconds=60)),
            ("Release", pb.ReleaseRequest(reservation_id="mine")),
            ("Fulfil", pb.FulfilRequest(reservation_id="mine")),
            ("GetReservation", pb.GetReservationRequest(reservation_id="mine")),
        ):
            code = await _call(r.channel, "Reservations", method, request, till)
            assert code == grpc.StatusCode.PERMISSION_DENIED, method
        batch = await r.reservations.Batch(
            pb.BatchRequest(ops=[pb.BatchOp(release=pb.ReleaseRequest(reservation_id="mine"))]),
            metadata=till,
        )
        assert batch.results[0].error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "'till' may not release reservation 'mine'" in batch.results[0].error.message
        mine = await r.reservations.GetReservation(
            pb.GetReservationRequest(reservation_id="mine"), metadata=_bearer("shop")
        )
        assert mine.state == pb.HELD
        # An admin may act on any reservation.
        await r.reservations.Release(
            pb.ReleaseRequest(reservation_id="mine"), metadata=_bearer("root")
        )
        seq, encode = r.daemon.ledger.snapshot_state()
        payload = encode()
    # wal dump names each record's type and shows who asked.
    out = io.StringIO()
    wal.dump(tmp_path / "data", out, decoded=True)
    lines = [line.split("\t") for line in out.getvalue().splitlines() if line[:1] != "#"]
    kinds = {line[1]: json.loads(line[6]) for line in lines}
    assert kinds["SET_STOCK"]["actor"] == "root"
    assert kinds["RESERVE"]["owner"] == "shop"
    assert kinds["RELEASE"]["reservation_id"] == "mine"
    # Snapshots keep the owner too.
    restored = Daemon(test_config())
    restored.ledger.restore(payload)
    assert restored.ledger.get("mine").owner == "shop"


def test_records_without_an_identity_decode_as_before():
    change = records.StockChange(1, "adj", "a", 5, None, "recount")
    old_layout = records.encode_stock(change)
    assert records.decode(records.RecordType.SET_STOCK, old_layout) == change
    assert records.decode(records.RecordType.SET_STOCK, old_layout).actor == ""
    audited = change._replace(actor="root")
    encoded = records.encode_stock(audited)
    assert encoded.startswith(old_layout) and len(encoded) > len(old_layout)
    assert records.decode(records.RecordType.SET_STOCK, encoded) == audited
    reserve = records.Reserve(1, "r", "", 60, False, 61_000, ("a",), (1,), (1,))
    assert records.decode(records.RecordType.RESERVE, records.encode_reserve(reserve)) == reserve
    owned = reserve._replace(owner="shop")
    assert records.decode(records.RecordType.RESERVE, records.encode_reserve(owned)) == owned


@aio
async def test_the_cli_speaks_mtls_and_tokens_with_flags_or_environment(pki, tmp_path, capsys):
    ca, _, _ = pki
    root_cert, root_key, _ = ca.issue("root", "root.example")
    config = dataclasses.replace(
        mtls_config(pki, auth_tokens_file=tokens_file(tmp_path)),
        auth_roles={"root.example": ("admin",), "feed": ("sync",)},
    )
    loop = asyncio.get_running_loop()
    async with running(config) as r:
        # Flags after the subcommand.
        code = await loop.run_in_executor(None, cli.main, [
            "set", "a", "7", "--target", r.target, "--ca", str(ca.ca_file),
            "--cert", str(root_cert), "--key", str(root_key),
        ])
        assert code == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["stock"]["on_hand"] == 7
        # The environment, and a token on top of the client certificate (the token names the
        # identity: feed may read but not set).
        environ = {"RESERVD_TARGET": r.target, "RESERVD_CA": str(ca.ca_file),
                   "RESERVD_CERT": str(root_cert), "RESERVD_KEY": str(root_key),
                   "RESERVD_TOKEN": TOKENS["feed"]}
        saved = {key: os.environ.get(key) for key in environ}
        os.environ.update(environ)
        try:
            assert await loop.run_in_executor(None, cli.main, ["get", "a"]) == 0
            assert json.loads(capsys.readouterr().out)["on_hand"] == 7
            assert await loop.run_in_executor(None, cli.main, ["set", "a", "9"]) == 2
            assert "PERMISSION_DENIED: identity 'feed'" in capsys.readouterr().err
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        # No client certificate: refused at the handshake, one line, exit status 2.
        code = await loop.run_in_executor(None, cli.main, [
            "--target", r.target, "--ca", str(ca.ca_file), "get", "a", "--deadline", "2",
        ])
        assert code == 2
        assert capsys.readouterr().err.startswith("reservd: UNAVAILABLE")
