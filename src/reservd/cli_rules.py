"""`reservd promo set|list`, `reservd velocity SKU` and `reservd rules set`: the velocity-rule and
promotion commands of the CLI (reservd.cli wires them in)."""
from __future__ import annotations

import datetime
import sys
import uuid

from reservd.rules import FIELDS
from reservd.v1 import reservd_pb2 as pb

COMMANDS = ("promo", "velocity", "rules")


def _when(text: str) -> int:
    """Unix milliseconds, or an ISO-8601 time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


def add_parsers(command, client_command, connection_options) -> None:
    """Add the commands; ``command``/``client_command``/``connection_options`` are
    reservd.cli's helpers."""

    def _options(parser) -> None:
        # --target and TLS given before the command (or RESERVD_*) are not overridden.
        connection_options(parser, suppress=True)
        parser.add_argument("--deadline", type=float, default=5.0,
                            help="seconds the call may take, retries included")

    promo = command("promo", "the promotion calendar: set, list")
    sub = promo.add_subparsers(dest="promo_command", required=True)
    for name, help_ in (("set", "put a promotion on the calendar (idempotent by its id)"),
                        ("list", "every promotion, its phase and units sold")):
        parser = sub.add_parser(name, help=help_, description=help_,
                                formatter_class=promo.formatter_class)
        _options(parser)
        if name == "set":
            parser.add_argument("promotion_id", help="its id (the same again changes nothing)")
            parser.add_argument("--sku", action="append", required=True,
                                help="a SKU it sells (repeatable)")
            parser.add_argument("--channel", action="append", required=True,
                                help="a channel it runs on (repeatable)")
            parser.add_argument("--starts-at", type=_when, required=True,
                                help="unix ms or ISO-8601 (UTC unless given)")
            parser.add_argument("--ends-at", type=_when, required=True,
                                help="unix ms or ISO-8601 (UTC unless given)")
            parser.add_argument("--forecast-units", type=int, required=True,
                                help="units it is expected to sell in all")
        else:
            parser.add_argument("--sku", default="", help="only promotions naming this SKU")
    sub = client_command("velocity", "a SKU's velocity per channel, baselines, rules in force")
    sub.add_argument("sku", help="the SKU")
    sub.add_argument("--pin", type=int, default=None, metavar="UNITS_PER_HOUR",
                     help="pin the baseline (0 and up) instead of the learned one")
    sub.add_argument("--unpin", action="store_true", help="back to the learned baseline")
    sub.add_argument("--channel", default="", help="pin for this channel only (default: all)")
    rules = command("rules", "the velocity rules' thresholds per channel and SKU")
    sub = rules.add_subparsers(dest="rules_command", required=True)
    parser = sub.add_parser("set", help="replace the thresholds set for a channel (and SKU)",
                            description="replace the thresholds set for a channel (and SKU); "
                            "unset ones keep their defaults", formatter_class=rules.formatter_class)
    _options(parser)
    parser.add_argument("channel", help='the channel ("" with --sku: every channel)')
    parser.add_argument("--sku", default="", help="only for this SKU")
    parser.add_argument("--enable", dest="enabled", action="store_const", const=True,
                        help="rules act on this channel")
    parser.add_argument("--disable", dest="enabled", action="store_const", const=False,
                        help="rules leave this channel alone (the default)")
    for name in FIELDS[1:]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help="see the README's rule table")
    parser.add_argument("--change-id", default=None, help="makes a retry safe")


async def run(client, args, emit) -> int:
    if args.command == "promo":
        if args.promo_command == "set":
            emit(await client.set_promotion(pb.SetPromotionRequest(
                promotion_id=args.promotion_id, skus=args.sku, channels=args.channel,
                starts_at_ms=args.starts_at, ends_at_ms=args.ends_at,
                forecast_units=args.forecast_units)))
        else:
            for promotion in await client.list_promotions(args.sku):
                emit(promotion)
    elif args.command == "velocity":
        if args.pin is not None or args.unpin:
            if args.pin is not None and args.unpin:
                print("reservd: --pin and --unpin: choose one", file=sys.stderr)
                return 2
            policy = pb.RulePolicy() if args.unpin else pb.RulePolicy(
                baseline_units_per_hour=args.pin)
            await client.set_rule_policy(pb.SetRulePolicyRequest(
                sku=args.sku, channel=args.channel, policy=policy,
                change_id=str(uuid.uuid4())))
        emit(await client.get_velocity(args.sku))
    else:
        fields = {name: getattr(args, name) for name in FIELDS}
        emit(await client.set_rule_policy(pb.SetRulePolicyRequest(
            channel=args.channel, sku=args.sku, change_id=args.change_id or str(uuid.uuid4()),
            policy=pb.RulePolicy(**{k: v for k, v in fields.items() if v is not None}))))
    return 0
