"""The exception tree (``meshipc._errors``): every public exception pickles
with its attributes, has a docstring and descends from ``MeshError``."""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import pytest

import meshipc
from meshipc import NodeId


def _exception_classes() -> list[type[BaseException]]:
    out = []
    for name in meshipc.__all__:
        obj = getattr(meshipc, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            out.append(obj)
    return out


EXCEPTIONS = _exception_classes()


def _sample_args(cls: type[BaseException]) -> dict[str, Any]:
    """Distinct, recognisable values for every constructor parameter."""
    kwargs: dict[str, Any] = {}
    sig = inspect.signature(cls.__init__)
    for i, (name, p) in enumerate(list(sig.parameters.items())[1:]):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        kwargs[name] = 1000 + i if ann == "int" else f"{name}-value-{i}"
    return kwargs


def test_exception_classes_found():
    names = {c.__name__ for c in EXCEPTIONS}
    assert {
        "MeshError",
        "ChannelClosed",
        "PortFailed",
        "NodeFailure",
        "RemoteError",
        "ProtocolError",
        "MessageError",
        "JoinError",
        "ConnectError",
        "InvitationReadError",
        "InvitationTooLarge",
        "InvitationDecodeError",
        "AuthenticationError",
        "MeshNameInUse",
    } <= names


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: c.__name__)
def test_exception_pickles_with_attributes(cls: type[BaseException]):
    kwargs = _sample_args(cls)
    exc = cls(**kwargs)
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(exc, protocol=proto))
        assert type(back) is cls
        assert str(back) == str(exc)
        assert back.args == exc.args
        for name, value in kwargs.items():
            if hasattr(exc, name):
                assert getattr(back, name) == value == getattr(exc, name)
        assert {k: v for k, v in vars(back).items() if not k.startswith("__")} == {
            k: v for k, v in vars(exc).items() if not k.startswith("__")
        }


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: c.__name__)
def test_exception_has_docstring_and_root(cls: type[BaseException]):
    doc = cls.__dict__.get("__doc__")
    assert doc and doc.strip(), f"{cls.__name__} has no docstring of its own"
    assert issubclass(cls, meshipc.MeshError)


def test_exception_attributes():
    e: Any = pickle.loads(
        pickle.dumps(meshipc.RemoteError("ValueError", "bad x", "Traceback...\nValueError"))
    )
    assert (e.type_name, e.message, e.traceback) == ("ValueError", "bad x", "Traceback...\nValueError")
    assert "ValueError" in str(e) and "bad x" in str(e)
    assert meshipc.RemoteError("KeyError", "k").traceback == ""

    node = NodeId.random().hex()
    e = pickle.loads(pickle.dumps(meshipc.NodeFailure(node, "connection reset")))
    assert (e.node, e.reason) == (node, "connection reset")
    assert isinstance(e, meshipc.PortFailed) and "connection reset" in e.cause

    e = pickle.loads(pickle.dumps(meshipc.PortFailed("gave up")))
    assert e.cause == "gave up"
    assert meshipc.PortFailed().cause

    e = pickle.loads(pickle.dumps(meshipc.ConnectError("/run/x.sock", "refused")))
    assert (e.path, e.reason) == ("/run/x.sock", "refused")
    assert "/run/x.sock" in str(e)

    e = pickle.loads(pickle.dumps(meshipc.InvitationReadError("/run/x.sock", "eof")))
    assert (e.path, e.reason) == ("/run/x.sock", "eof")

    e = pickle.loads(pickle.dumps(meshipc.InvitationTooLarge("/run/x.sock", 70000, 65536)))
    assert (e.path, e.length, e.limit) == ("/run/x.sock", 70000, 65536)
    assert "70000" in str(e)


def test_exception_hierarchy():
    m = meshipc
    assert issubclass(m.NodeFailure, m.PortFailed)
    assert issubclass(m.MessageError, ValueError)
    assert issubclass(m.HandshakeError, m.ProtocolError)
    for name in (
        "ConnectError",
        "InvitationReadError",
        "InvitationTooLarge",
        "InvitationDecodeError",
        "AuthenticationError",
        "MeshNameInUse",
        "InvitationExpired",
    ):
        assert issubclass(getattr(m, name), m.JoinError), name
    # "could not connect" and "connected, then the stream broke" are told apart
    assert not issubclass(m.InvitationReadError, m.ConnectError)
    assert not issubclass(m.ConnectError, m.InvitationReadError)
    for a in (m.ChannelClosed, m.PortFailed, m.RemoteError, m.ProtocolError, m.JoinError):
        for b in (m.ChannelClosed, m.PortFailed, m.RemoteError, m.ProtocolError, m.JoinError):
            assert (a is b) == issubclass(a, b), (a, b)
