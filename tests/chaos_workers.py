"""The hubs of the chaos runs (``test_chaos.py``), started by
``Mesh.spawn("chaos_workers:hub", arg)``.

A hub's inbox receives stream hand-offs ``{"stream": s, "rx": Receiver,
"seen": {key: next}, "counts": {key: total}, "hops": h, "take": [lo, hi], "seed": n}``. For each
one it starts a task that reads a random number of values (in ``take``)
from ``rx``, checking that the values of each producer key arrive in order
(``[key, i]`` with ``i == seen[key]``), then hands ``rx`` to a random other
hub. Values ``["probe", 0]`` are the test checking the stream still lives;
they are not counted. Reports to the test, on ``report``:

* ``["hop", s, idx, seen, ok, next]`` just before handing the stream on;
* ``["all", s, idx, seen, ok, None]`` once every value of every key in
  ``counts`` was read here;
* ``["end", s, idx, seen, ok, how]`` when the stream ended here: ``how``
  is ``"closed"`` or ``"<ExceptionType>: <message>"``.

A hub whose ``idx`` is a multiple of 3 is a slow consumer (about a
millisecond of work every 50 reads). Several streams can be at one hub
at once.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from meshipc import ChannelClosed, MeshError, Receiver, Sender


def _work() -> int:
    """About a millisecond of CPU: what a slow consumer does per batch."""
    return sum(i * i for i in range(20_000))


async def hub(arg: dict[str, Any]) -> None:
    idx: int = arg["idx"]
    inbox: Receiver[Any] = arg["inbox"]
    peers: list[Sender[Any]] = arg["peers"]
    report: Sender[Any] = arg["report"]
    slow = idx % 3 == 0
    tasks: set[asyncio.Task[None]] = set()

    async def serve(m: dict[str, Any]) -> None:
        s: int = m["stream"]
        rx: Receiver[Any] = m["rx"]
        seen: dict[str, int] = dict(m["seen"])
        hops: int = m["hops"]
        counts: dict[str, int] = m["counts"]
        rng = random.Random(m["seed"] * 7919 + hops)
        n = rng.randint(*m["take"])
        ok = True
        how = None
        reads = 0
        try:
            while reads < n:
                v = await rx.recv()
                key, i = str(v[0]), v[1]
                if key == "probe":
                    continue
                if seen.get(key, 0) != i:
                    ok = False
                seen[key] = i + 1
                reads += 1
                if i + 1 == counts.get(key) and all(seen.get(k, 0) >= c for k, c in counts.items()):
                    report.send(["all", s, idx, seen, ok, None])
                if slow and reads % 50 == 0:
                    _work()
        except ChannelClosed:
            how = "closed"
        except MeshError as exc:
            how = f"{type(exc).__name__}: {exc}"
        if how is not None:
            report.send(["end", s, idx, seen, ok, how])
            rx.close()
            return
        nxt = rng.choice([i for i in range(len(peers)) if i != idx])
        report.send(["hop", s, idx, seen, ok, nxt])
        try:
            peers[nxt].send({**m, "rx": rx, "seen": seen, "hops": hops + 1})
        except MeshError as exc:
            report.send(["end", s, idx, seen, ok, f"{type(exc).__name__}: {exc}"])
            rx.close()

    async for m in inbox:
        t = asyncio.create_task(serve(m))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
