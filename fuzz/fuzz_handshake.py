"""Fuzz a node's handshake acceptor over a socket pair: whatever a peer
sends, the acceptor refuses it (it never admits a peer without the secret)
and raises nothing (see README.md)."""

import asyncio
import socket
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from meshipc._codec import CODEC
    from meshipc._handshake import MeshSecret
    from meshipc._node import Node

LOOP = asyncio.new_event_loop()
DIRECTORY = tempfile.mkdtemp(prefix="fz")


async def feed(data: bytes) -> None:
    node = Node(DIRECTORY, MeshSecret(), codec=CODEC)  # not started: no socket file
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    task = asyncio.ensure_future(node.accept_connection(ours, hello_timeout=1.0))
    try:
        await LOOP.sock_sendall(theirs, data)
        theirs.shutdown(socket.SHUT_WR)
        try:
            while await asyncio.wait_for(LOOP.sock_recv(theirs, 4096), 5):
                pass
        except ConnectionResetError:
            pass
        await asyncio.wait_for(task, 5)
        if node.links or node.rejected != 1:
            raise AssertionError(f"admitted={bool(node.links)} rejected={node.rejected} for {data!r}")
    finally:
        theirs.close()
        task.cancel()
        await node.close(linger=0)


def one(data: bytes) -> None:
    LOOP.run_until_complete(feed(data))


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
