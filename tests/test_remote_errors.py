"""Remote errors keep their type: a built-in exception raised by a callee
(or one registered with ``register_remote_error``) is caught at the caller
by its own type, and still by ``RemoteError``; the remote traceback is
shown once, as a note; a peer cannot name a type that ends the caller."""

from __future__ import annotations

import pickle
import traceback

import pytest

import meshipc
from meshipc._errors import MAX_REMOTE_TRACEBACK_NOTE, remote_type_name


class AppError(Exception):
    """An application's own error type, registered in the tests that use it."""


TB = 'Traceback (most recent call last):\n  File "worker.py", line 3, in handler\nValueError: bad\n'


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("ValueError", ValueError),
        ("KeyError", KeyError),
        ("LookupError", LookupError),
        ("ZeroDivisionError", ArithmeticError),
        ("FileNotFoundError", OSError),
        ("TimeoutError", TimeoutError),
        ("UnicodeDecodeError", ValueError),  # its constructor needs more: raised as UnicodeError
    ],
)
def test_a_builtin_remote_error_is_caught_by_its_type(name: str, base: type[Exception]) -> None:
    with pytest.raises(base) as info:
        raise meshipc.RemoteError(name, "bad", TB)
    err = info.value
    assert isinstance(err, meshipc.RemoteError)
    assert isinstance(err, meshipc.MeshError)
    assert (err.type_name, err.message, err.traceback) == (name, "bad", TB)
    assert str(err) == f"{name}: bad"  # not KeyError's repr, not OSError's errno form


@pytest.mark.parametrize(
    "name",
    [
        "SystemExit",
        "KeyboardInterrupt",
        "GeneratorExit",
        "StopIteration",
        "StopAsyncIteration",
        "BaseException",
        "CancelledError",
        "no.such.Type",
        "",
    ],
)
def test_a_peer_cannot_name_a_type_that_ends_the_caller(name: str) -> None:
    err = meshipc.RemoteError(name, "x")
    assert type(err) is meshipc.RemoteError
    assert not isinstance(
        err, (SystemExit, KeyboardInterrupt, GeneratorExit, StopIteration, StopAsyncIteration)
    )


def test_the_remote_traceback_shows_once_as_a_note() -> None:
    try:
        raise meshipc.RemoteError("ValueError", "bad", TB)
    except ValueError:
        shown = traceback.format_exc()
    assert shown.count('File "worker.py", line 3') == 1
    assert "remote traceback:" in shown
    assert meshipc.RemoteError("ValueError", "bad").__dict__.get("__notes__") is None


def test_a_huge_remote_traceback_is_cut_in_the_note_and_kept_whole() -> None:
    tb = "x" * (MAX_REMOTE_TRACEBACK_NOTE * 4) + "\nValueError: the end\n"
    err = meshipc.RemoteError("ValueError", "bad", tb)
    (note,) = err.__notes__
    assert len(note) < MAX_REMOTE_TRACEBACK_NOTE + 100
    assert note.endswith("ValueError: the end")
    assert err.traceback == tb


def test_remote_errors_pickle_to_the_same_type() -> None:
    err = meshipc.RemoteError("KeyError", "'k'", TB)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert (back.type_name, back.message, back.traceback) == ("KeyError", "'k'", TB)


def test_a_registered_type_is_caught_by_its_type() -> None:
    name = remote_type_name(AppError)
    assert name == f"{__name__}.AppError"
    assert not isinstance(meshipc.RemoteError(name, "x"), AppError)
    assert meshipc.register_remote_error(AppError) is AppError
    with pytest.raises(AppError) as info:
        raise meshipc.RemoteError(name, "app failed")
    assert isinstance(info.value, meshipc.RemoteError)
    assert str(info.value) == f"{name}: app failed"


@pytest.mark.parametrize(
    "bad", [int, SystemExit, KeyboardInterrupt, StopIteration, meshipc.RemoteError, "ValueError"]
)
def test_register_refuses_what_cannot_be_a_remote_error(bad: object) -> None:
    with pytest.raises(TypeError):
        meshipc.register_remote_error(bad)  # type: ignore[arg-type]


def test_builtin_names_are_bare_and_others_qualified() -> None:
    assert remote_type_name(ValueError) == "ValueError"
    assert remote_type_name(meshipc.MeshError) == "MeshError"  # meshipc's own: bare, never mapped
    assert type(meshipc.RemoteError("MeshError", "x")) is meshipc.RemoteError
