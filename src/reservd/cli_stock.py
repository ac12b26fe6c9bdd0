"""`reservd return`, `inspect`, `writeoff`, `hold`, `unhold`, `expect` and `receive`: the
stock-state and incoming-stock commands of the CLI (reservd.cli wires them in)."""
from __future__ import annotations

import uuid

COMMANDS = ("return", "inspect", "writeoff", "hold", "unhold", "expect", "receive")


def add_parsers(client_command) -> None:
    """Add the stock-state commands; ``client_command`` is reservd.cli's helper."""
    sub = client_command("return", "returned units arrive into quarantine (not available)")
    sub.add_argument("return_id", help="the return's id (a retry reuses it)")
    sub.add_argument("sku", help="the SKU")
    sub.add_argument("units", type=int, help="units returned")
    sub.add_argument("--reservation-id", default="", help="the order they came back from")
    sub = client_command("inspect", "end a return's quarantine: sellable and damaged units")
    sub.add_argument("return_id", help="the return")
    sub.add_argument("sellable_units", type=int, help="units that become available")
    sub.add_argument("damaged_units", type=int, help="units that move to damaged")
    sub = client_command("writeoff", "remove damaged units (on_hand falls with them)")
    sub.add_argument("sku", help="the SKU")
    sub.add_argument("units", type=int, help="units written off")
    sub.add_argument("--state", default="damaged", help="the state they leave (damaged)")
    sub.add_argument(
        "--change-id", default=None,
        help="makes a retry safe: the same id is applied once (default: a random UUID)",
    )
    for name, text in (("hold", "set units aside from the shared bucket (never available)"),
                       ("unhold", "return held units to the shared bucket")):
        sub = client_command(name, text)
        sub.add_argument("sku", help="the SKU")
        sub.add_argument("units", type=int, help="units moved")
        sub.add_argument("--state", default="safety_stock",
                         help="safety_stock (default) or quality_control")
        sub.add_argument(
            "--change-id", default=None,
            help="makes a retry safe: the same id is applied once (default: a random UUID)",
        )
    sub = client_command("expect", "a purchase order: units on the way (incoming, not on hand)")
    sub.add_argument("po_id", help="the purchase order's id (a retry reuses it)")
    sub.add_argument("sku", help="the SKU")
    sub.add_argument("units", type=int, help="units ordered")
    sub.add_argument("--eta-ms", type=int, default=0, help="Unix ms they are due (default 0)")
    sub = client_command("receive", "a (partial) receipt against a purchase order")
    sub.add_argument("po_id", help="the purchase order")
    sub.add_argument("units", type=int, help="units received")
    sub.add_argument(
        "--receipt-id", default=None,
        help="makes a retry safe: the same id is applied once (default: a random UUID)",
    )


async def run(client, args, emit) -> int:
    if args.command == "return":
        emit(await client.receive_return(
            args.return_id, args.sku, args.units, reservation_id=args.reservation_id
        ))
    elif args.command == "inspect":
        emit(await client.inspect(args.return_id, args.sellable_units, args.damaged_units))
    elif args.command in ("hold", "unhold"):
        units = args.units if args.command == "hold" else -args.units
        emit(await client.hold_stock(
            args.sku, args.state, units, change_id=args.change_id or str(uuid.uuid4())
        ))
    elif args.command == "expect":
        emit(await client.expect_receipt(args.po_id, args.sku, args.units, args.eta_ms))
    elif args.command == "receive":
        emit(await client.receive(
            args.po_id, args.units, receipt_id=args.receipt_id or str(uuid.uuid4())
        ))
    else:
        emit(await client.write_off(
            args.sku, args.units, args.state, change_id=args.change_id or str(uuid.uuid4())
        ))
    return 0
