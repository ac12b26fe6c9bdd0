"""The ceiling of Python gRPC on this machine: reservd's API over a dict, on grpc.aio + uvloop.

    python bench/ceiling_server.py --bind 127.0.0.1:0

Reserve checks and decrements a dict (all or nothing) and remembers the reservation id; SetStock,
AdjustStock and GetStock work on the same dict. No log, no durability, no expiry, no watchers:
what is left is the cost of the gRPC stack and protobuf, which reservd cannot go below. Started
by bench/sidebyside.py; like `reservd serve` it logs one JSON line {"msg": "serving", "port": N}
on stderr once it listens, and stops on SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

import grpc
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from reservd.v1 import reservd_pb2 as pb  # noqa: E402
from reservd.v1 import reservd_pb2_grpc as pb_grpc  # noqa: E402


class Store:
    def __init__(self) -> None:
        self.on_hand: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.reservations: dict[str, pb.ReserveResponse] = {}
        self.seq = 0

    def row(self, sku: str) -> pb.Stock:
        on_hand, reserved = self.on_hand[sku], self.reserved[sku]
        return pb.Stock(sku=sku, on_hand=on_hand, reserved=reserved,
                        available=on_hand - reserved)


class Reservations(pb_grpc.ReservationsServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    async def Reserve(self, request, context):
        store = self.store
        previous = store.reservations.get(request.reservation_id)
        if previous is not None:
            return previous
        on_hand, reserved = store.on_hand, store.reserved
        for line in request.lines:
            if line.sku not in on_hand:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"sku {line.sku!r} is unknown")
        granted = all(
            on_hand[line.sku] - reserved[line.sku] >= line.quantity for line in request.lines
        )
        if granted:
            for line in request.lines:
                reserved[line.sku] += line.quantity
            store.seq += 1
        response = pb.ReserveResponse(
            granted=granted,
            lines=[
                pb.LineOutcome(
                    sku=line.sku, requested=line.quantity,
                    granted=line.quantity if granted else 0,
                    available=on_hand[line.sku] - reserved[line.sku],
                )
                for line in request.lines
            ],
            state=pb.HELD if granted else 0,
            sequence=store.seq if granted else 0,
        )
        if granted:
            store.reservations[request.reservation_id] = response
        return response

    async def GetStock(self, request, context):
        return pb.GetStockResponse(stock=[self.store.row(sku) for sku in request.skus])


class Admin(pb_grpc.AdminServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    def _answer(self, sku: str, previous: int) -> pb.StockAdjustmentResponse:
        self.store.seq += 1
        return pb.StockAdjustmentResponse(
            stock=self.store.row(sku), previous_on_hand=previous, sequence=self.store.seq
        )

    async def SetStock(self, request, context):
        store = self.store
        previous = store.on_hand.get(request.sku, 0)
        store.on_hand[request.sku] = request.on_hand
        store.reserved.setdefault(request.sku, 0)
        return self._answer(request.sku, previous)

    async def AdjustStock(self, request, context):
        store = self.store
        if request.sku not in store.on_hand:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"sku {request.sku!r} is unknown")
        previous = store.on_hand[request.sku]
        store.on_hand[request.sku] = previous + request.delta
        return self._answer(request.sku, previous)


async def serve(bind: str) -> None:
    store = Store()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_ReservationsServicer_to_server(Reservations(store), server)
    pb_grpc.add_AdminServicer_to_server(Admin(store), server)
    port = server.add_insecure_port(bind)
    await server.start()
    print(json.dumps({"msg": "serving", "port": port}), file=sys.stderr, flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bind", default="127.0.0.1:0")
    uvloop.run(serve(parser.parse_args().bind))


if __name__ == "__main__":
    main()
