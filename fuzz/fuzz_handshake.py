"""Fuzz a node's handshake acceptor over a socket pair: whatever a peer
sends, the acceptor refuses it (it never admits a peer without a credential
of the mesh and a signature over this handshake's nonce) and raises nothing
(see README.md). Inputs starting with byte 0x01 get a valid HELLO put in
front and a real certificate of the mesh spliced into their AUTH, so the
fuzzer reaches the certificate and signature checks."""

import asyncio
import socket
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from meshipc._codec import CODEC
    from meshipc._handshake import ROLE_WORKER, Authority, build_hello, new_hello
    from meshipc._node import Node

LOOP = asyncio.new_event_loop()
DIRECTORY = tempfile.mkdtemp(prefix="fz")
MESH = Authority()
PEER = MESH.issue(ROLE_WORKER)  # a real certificate the fuzzer presents (without the key)


def shape(data: bytes) -> bytes:
    if data[:1] != b"\x01":
        return data
    return build_hello(new_hello()) + PEER.cert_bytes + data[1:]


async def feed(data: bytes) -> None:
    node = Node(DIRECTORY, MESH.issue(ROLE_WORKER), codec=CODEC)  # not started: no socket file
    data = shape(data)
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
