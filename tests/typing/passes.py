"""Checked by ``mypy --strict`` in CI (``.ci/run``): the types a user's
code gets from meshipc, line by line (``assert_type``). Not run."""

from __future__ import annotations

from typing import Any, assert_type

import msgspec

import meshipc


class Rect(msgspec.Struct):
    w: int
    h: int


async def channels() -> None:
    tx, rx = meshipc.channel(int)
    assert_type(tx, meshipc.Sender[int])
    assert_type(rx, meshipc.Receiver[int])
    tx.send(1)
    assert_type(await rx.recv(), int)
    assert_type(rx.try_recv(), int)
    async for value in rx:
        assert_type(value, int)
    assert_type(tx.clone(), meshipc.Sender[int])

    utx, urx = meshipc.channel()
    assert_type(utx, meshipc.Sender[Any])
    assert_type(await urx.recv(), Any)

    stx, srx = meshipc.channel(Rect)
    assert_type(await srx.recv(), Rect)
    stx.send(Rect(1, 2))


async def ports(untyped: meshipc.Port) -> None:
    a, b = meshipc.Port.pair(int)
    assert_type(a, meshipc.Port[int])
    a.send(1)
    assert_type(await b.recv(), int)
    async for value in b:
        assert_type(value, int)
    p, _ = meshipc.Port.pair()
    assert_type(await p.recv(), Any)
    assert_type(untyped, meshipc.Port[Any])  # a bare Port is a Port[Any]


async def rpc() -> None:
    tx, rx = meshipc.channel(meshipc.Rpc[Rect, int])
    assert_type(await tx.call(Rect(2, 3)), int)
    call = await rx.recv()
    assert_type(call, meshipc.Rpc[Rect, int])
    assert_type(call.request, Rect)
    call.reply(call.request.w * call.request.h)

    ctx, crx = meshipc.channel(meshipc.Call[str])
    assert_type(await ctx.call("x"), Any)  # reply untyped: Call types only the request
    assert_type((await crx.recv()).request, str)


async def control(conn: meshipc.Attachment, mesh: meshipc.Mesh) -> None:
    assert_type(await conn.call("area", {"w": 1, "h": 2}), Any)
    assert_type(await conn.call("area", {"w": 1, "h": 2}, reply_type=int), int)
    assert_type(await mesh.call("area", Rect(1, 2), 5.0, reply_type=Rect), Rect)
    attached = await meshipc.connect("vmm")
    assert_type(attached, meshipc.Attachment)
    await attached.aclose()
    async with meshipc.connect("vmm") as held:
        assert_type(held, meshipc.Attachment)
