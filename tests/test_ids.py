"""Node and port ids (``meshipc._ids``)."""

from __future__ import annotations

import pytest

from meshipc import NodeId, PortId


@pytest.mark.parametrize("cls", [NodeId, PortId])
def test_ids(cls: type[NodeId] | type[PortId]):
    a, b = cls.random(), cls.random()
    assert type(a) is cls and isinstance(a, bytes)
    assert len(a) == len(b) == 16
    assert a != b
    # usable wherever the raw bytes are (table keys off the wire)
    assert a == bytes(a) and hash(a) == hash(bytes(a)) and {bytes(a): 1}[a] == 1
    r = repr(a)
    assert a.hex()[:8] in r and a.hex() not in r and len(r) <= 40
    assert a.hex() not in str(a) and str(a) and a.hex().startswith(str(a))
    c = cls.from_hex(a.hex())
    assert c == a and type(c) is cls
    assert cls.from_hex(a.hex().upper()) == a


@pytest.mark.parametrize("cls", [NodeId, PortId])
@pytest.mark.parametrize("text", ["", "ab", "ab" * 15, "ab" * 17, "zz" * 16, "abc", "g" + "0" * 31, "0" * 33])
def test_id_from_bad_hex(cls: type[NodeId], text: str):
    with pytest.raises(ValueError):
        cls.from_hex(text)


def test_ids_are_random_enough():
    ids = {NodeId.random() for _ in range(1000)} | {PortId.random() for _ in range(1000)}
    assert len(ids) == 2000
