"""`reservd replenish`, `replenish-set` and `audit`: the replenishment table, one SKU's
settings, and the SKUs due for a cycle count (reservd.cli wires them in)."""
from __future__ import annotations

from reservd import output

COMMANDS = ("replenish", "replenish-set", "audit")


def add_parsers(client_command) -> None:
    """Add the planning commands; ``client_command`` is reservd.cli's helper."""
    sub = client_command(
        "replenish", "the replenishment table: SKU, D, sigma_D, LT, safety stock, reorder point, "
        "on hand, incoming, days of cover (--format table for columns)")
    sub.add_argument("skus", nargs="*", help="SKUs (default: every planned SKU, in order)")
    sub.add_argument("--after", default="", help="start after this SKU (paging)")
    sub.add_argument("--limit", type=int, default=0, help="rows at most (0: the server's)")
    sub = client_command("replenish-set", "one SKU's replenishment settings (replaces them)")
    sub.add_argument("sku", help="the SKU")
    sub.add_argument("--lead-time-days", type=float, required=True, help="order to receipt")
    sub.add_argument("--lead-time-sigma-days", type=float, default=0.0,
                     help="standard deviation of the lead time (default 0)")
    sub.add_argument("--service-level", type=float, default=0.0,
                     help="e.g. 0.95 (default: by ABC class)")
    sub.add_argument("--abc-class", default="", choices=("", "A", "B", "C"),
                     help="A, B or C (default: by units committed)")
    sub.add_argument("--seasonal", default="",
                     help="twelve monthly indices, commas between, January first "
                     "(default: the server's)")
    sub = client_command("audit", "cycle counts: the SKUs due for a count, with ghost stock")
    sub.add_argument("--all", action="store_true", help="every SKU, not only those due")
    sub.add_argument("--limit", type=int, default=0, help="rows at most (0: the server's)")


async def run(client, args, emit) -> int:
    if args.command == "replenish":
        rows = await client.get_replenishment(args.skus, args.after, args.limit)
        output.emit_all(rows, args.format)
    elif args.command == "replenish-set":
        seasonal = [float(part) for part in args.seasonal.split(",")] if args.seasonal else []
        emit(await client.set_replenishment(
            args.sku, args.lead_time_days, args.lead_time_sigma_days, args.service_level,
            args.abc_class, seasonal,
        ))
    else:
        response = await client.get_audit(args.all, args.limit)
        output.emit_all(list(response.skus), args.format)
    return 0
