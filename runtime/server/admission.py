"""Fair admission: no client connection holds more than its share of the shared queue.

Texts in flight are counted per gRPC peer (one TCP connection). A unary request that would take its
connection past the share is refused with RESOURCE_EXHAUSTED for that client alone; a stream waits
instead (back-pressure through gRPC's flow control), and holds at most `stream_inflight` requests in
flight, so a flood on one stream neither fills the queue nor grows the server's memory.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict

from adapterserve.runtime.errors import ResourceExhaustedError


class ClientShares:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # texts in flight one connection may hold
        self._held: dict[str, int] = defaultdict(int)
        self._changed = asyncio.Condition()

    def take(self, peer: str, texts: int) -> None:
        held = self._held[peer]
        if held + texts > self.limit:
            raise ResourceExhaustedError(
                f"this connection already has {held} texts in flight; its share of the queue is {self.limit} "
                "(--max-client-share of --max-queue): wait for answers before sending more", reason="client_share")
        self._held[peer] = held + texts

    async def wait_and_take(self, peer: str, texts: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._held[peer] + texts <= self.limit)
            self._held[peer] += texts

    async def give_back(self, peer: str, texts: int) -> None:
        async with self._changed:
            self._held[peer] -= texts
            if self._held[peer] <= 0:
                del self._held[peer]
            self._changed.notify_all()

    def held(self, peer: str) -> int:
        return self._held.get(peer, 0)
