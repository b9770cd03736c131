"""Must NOT pass ``mypy --strict``: each line marked ``# error`` is an
error the types above catch (``tests/typing/check.py`` checks that mypy
reports exactly those lines). Not run."""

from __future__ import annotations

import meshipc


async def wrong() -> None:
    tx, rx = meshipc.channel(int)
    tx.send("not an int")  # error
    text: str = await rx.recv()  # error
    rtx, rrx = meshipc.channel(meshipc.Rpc[int, str])
    await rtx.call("not an int")  # error
    doubled: int = await rtx.call(2)  # error
    call = await rrx.recv()
    call.reply(42)  # error
    conn = await meshipc.connect("vmm")
    n: str = await conn.call("area", 1, reply_type=int)  # error
    a, b = meshipc.Port.pair(bytes)
    a.send(1)  # error
    del text, doubled, n, b
