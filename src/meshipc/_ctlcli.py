"""``meshipc status | inspect | call``: the control plane from a terminal.

Each command attaches to the named mesh as a client, asks, prints and
detaches. Errors print one line that says what to do and exit non-zero
(1: the mesh or the service said no; 2: bad usage); ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from ._attach import connect
from ._errors import ConnectError, JoinError, MeshError, NodeFailure, RemoteError, ServiceNotFound
from ._logs import level_number
from ._names import RUNS_ELSEWHERE, mesh_directory, runtime_root
from ._tlsclient import connect_tls
from ._top import HOME, SORT_KEYS, run_top

#: Default seconds each node gets to answer ``status`` and ``inspect``.
DEFAULT_TIMEOUT = 1.0
#: Default seconds ``call`` waits for the service's reply.
CALL_TIMEOUT = 10.0
#: Seconds to attach to the mesh before giving up (at least the -t timeout).
ATTACH_TIMEOUT = 2.0
#: Levels of nesting shown from a peer's answer (and taken from a JSON
#: argument); deeper parts show as ``TOO_DEEP``: the terminal output stays
#: readable and no recursion limit is reached on a hostile answer.
MAX_DEPTH = 64
TOO_DEEP = "<nested too deeply>"


def term(text: Any) -> str:
    """``text`` (anything a peer sent) safe for a terminal: every character
    that is not printable (control characters, ESC, newlines, bidi overrides
    and other format characters, lone surrogates) shows as a ``\\xNN`` /
    ``\\uNNNN`` / ``\\UNNNNNNNN`` escape; a backslash shows doubled, so an
    escape a peer typed out cannot pass for one of ours."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable() and "\\" not in s:
        return s
    out = []
    for c in s:
        if c == "\\":
            out.append("\\\\")
        elif c.isprintable():
            out.append(c)
        else:
            o = ord(c)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def plain(value: Any, depth: int = 0) -> Any:
    """A peer's answer as JSON-ready data: keys made strings (a tuple key
    shows as its repr), tuples as lists, nesting cut at ``MAX_DEPTH``."""
    if depth >= MAX_DEPTH:
        return TOO_DEEP
    if isinstance(value, dict):
        return {(k if isinstance(k, str) else repr(k)): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)  # handles (ports, fds), bytes: no JSON form


def _json(value: Any, **kw: Any) -> str:
    """``value`` (already ``plain``) as JSON: strings escaped (``\\uNNNN``
    for anything not ASCII), so it is terminal-safe too."""
    return json.dumps(value, **kw)


def _json_arg(text: str, what: str) -> Any:
    """A JSON command-line argument, refused (``CliError``, status 2) when
    malformed or nested deeper than ``MAX_DEPTH``."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise CliError(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)", 2) from None
    if _depth_over(value, MAX_DEPTH):
        raise CliError(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)", 2)
    return value


def _depth_over(value: Any, limit: int) -> bool:
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return False


class CliError(Exception):
    """One line for the user; exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class RawEpilog(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal; epilogs (examples) kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


#: ``--runtime-dir``'s help, for every command.
RUNTIME_DIR_HELP = (
    "runtime folder holding the meshes (default: $MESHIPC_RUNTIME_DIR, $XDG_RUNTIME_DIR, "
    "/run/user/UID, else /tmp/meshipc-UID)"
)


def add_commands(sub: Any) -> None:
    """Add the control-plane subcommands to the ``meshipc`` parser."""
    common = argparse.ArgumentParser(add_help=False)  # every command
    common.add_argument("--runtime-dir", metavar="DIR", help=RUNTIME_DIR_HELP)
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    common.add_argument(
        "name", metavar="NAME", nargs="?", help="name of a running mesh (see `meshipc ls`); not with --access"
    )
    common.add_argument(
        "--access",
        metavar="PATH",
        help="attach over TLS to a mesh on another host with this access file (from TlsListener.grant)",
    )
    asks_nodes = argparse.ArgumentParser(add_help=False)  # status and inspect
    asks_nodes.add_argument(
        "-t",
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds each node gets to answer (default: %(default)s)",
    )

    st = sub.add_parser(
        "status",
        parents=[common, asks_nodes],
        help="one screen about a running mesh: pid, uptime, nodes, workers, services, clients",
        description="Attach to the mesh NAME and summarize it: pid, uptime, nodes, workers, services, "
        "attached clients.",
        epilog="examples:\n  meshipc status vmm\n  meshipc status vmm -j      # as JSON",
        formatter_class=RawEpilog,
    )
    st.add_argument("-j", "--json", action="store_true", help="print the summary as JSON")

    ins = sub.add_parser(
        "inspect",
        parents=[common, asks_nodes],
        help="show the live inspect tree of a running mesh",
        description="Attach to the mesh NAME and print its inspect tree (or the part at PATH, "
        "e.g. nodes/<id prefix>/connections). Counters (totals that only grow) show as numbers; "
        "with -p, followed by their rate per second.",
        epilog="examples:\n  meshipc inspect vmm\n  meshipc inspect vmm nodes -r\n"
        "  meshipc inspect vmm nodes -p --count 5   # rates, five times\n"
        "  meshipc inspect vmm nodes/3fa2/paused -u true   # an entry the node made updatable",
        formatter_class=RawEpilog,
    )
    ins.add_argument("path", metavar="PATH", nargs="?", default="", help="part of the tree, '/'-separated")
    ins.add_argument("-r", "--recursive", action="store_true", help="the whole subtree (default: one level)")
    ins.add_argument("-l", "--limit", type=int, metavar="N", help="show N levels (implies -r up to N)")
    ins.add_argument("-j", "--json", action="store_true", help='print JSON (counters as {"$counter": n})')
    ins.add_argument("-s", "--sensitive", action="store_true", help="include entries marked sensitive")
    ins.add_argument("-p", "--poll", action="store_true", help="repeat, showing counters as rates per second")
    ins.add_argument(
        "--period", type=float, default=1.0, metavar="S", help="seconds between polls (default: %(default)s)"
    )
    ins.add_argument("--count", type=int, metavar="N", help="stop after N polls (default: until Ctrl-C)")
    ins.add_argument(
        "-u",
        "--update",
        metavar="VALUE",
        help="set the updatable entry at PATH (nodes/<id>/<entry>) to VALUE (JSON, else a string)",
    )

    ca = sub.add_parser(
        "call",
        parents=[common],
        help="call a service of a running mesh and print the reply as JSON",
        description="Attach to the mesh NAME, call SERVICE with the JSON request and print the reply.",
        epilog="examples:\n  meshipc call vmm double 5\n  meshipc call jobs jobs '[\"list\"]' -t 30",
        formatter_class=RawEpilog,
    )
    ca.add_argument("service", metavar="SERVICE", nargs="?", help="service name (see `meshipc status NAME`)")
    ca.add_argument(
        "request", metavar="JSON", nargs="?", default="null", help="the request as JSON (default: null)"
    )
    ca.add_argument(
        "-t",
        "--timeout",
        type=float,
        default=CALL_TIMEOUT,
        metavar="S",
        help="seconds to wait for the reply (default: %(default)s)",
    )

    lg = sub.add_parser(
        "log",
        parents=[common, asks_nodes],
        help="change the log level of a running mesh's workers, live",
        description="Attach to the mesh NAME and set the level of WORKER's root logger (of every worker "
        "of the mesh's first node without WORKER) to LEVEL; the worker's next record obeys it. Workers' "
        "records show in the mesh's own log, with the worker's name.",
        epilog="examples:\n  meshipc log vmm DEBUG             # every worker\n"
        "  meshipc log vmm ticker INFO\n  meshipc log vmm ticker DEBUG --logger app.db",
        formatter_class=RawEpilog,
    )
    lg.add_argument("what", metavar="[WORKER] LEVEL", nargs="+", help="a worker name (optional) and a level")
    lg.add_argument("--logger", default="", metavar="NAME", help="a logger of the worker (default: its root)")

    tp = sub.add_parser(
        "top",
        parents=[common, asks_nodes],
        help="a live view of a running mesh: nodes, CPU, memory, message rates, queues, services",
        description="Attach to the mesh NAME and show its nodes (workers, root, attached clients; not this "
        "command's own) with pid, CPU, RSS, messages and bytes per second in and out, messages queued and "
        "unconsumed, pending calls and services, refreshed in place. Keys: q quits, s changes the sort.",
        epilog="examples:\n  meshipc top vmm\n  meshipc top vmm --sort in --period 0.5\n"
        "  meshipc top vmm --count 1 | cat    # one table, no terminal control",
        formatter_class=RawEpilog,
    )
    tp.add_argument("--sort", choices=SORT_KEYS, default="cpu", help="sort key (default: %(default)s)")
    tp.add_argument(
        "--period",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between refreshes (default: %(default)s)",
    )
    tp.add_argument("--count", type=int, metavar="N", help="stop after N refreshes (default: until q)")


COMMANDS = ("status", "inspect", "call", "log", "top")


def _positionals(args: argparse.Namespace) -> None:
    """With ``--access`` there is no NAME: the positionals shift left
    (``call --access PATH SERVICE JSON``, ``inspect --access PATH PATH``).
    ``args.name`` then names the access file in messages."""
    if args.access is None:
        if args.name is None:
            raise CliError("NAME is required (or --access PATH for a mesh on another host)", 2)
        if args.cmd == "call" and args.service is None:
            raise CliError("SERVICE is required", 2)
        return
    given = args.name
    if args.cmd == "call":
        if given is None:
            raise CliError("SERVICE is required", 2)
        if args.request != "null":
            raise CliError("too many arguments: with --access, give SERVICE [JSON]", 2)
        args.service, args.request = given, args.service if args.service is not None else "null"
    elif args.cmd == "inspect" and given is not None:
        if args.path:
            raise CliError("too many arguments: with --access, give [PATH]", 2)
        args.path = given
    elif given is not None:
        raise CliError("with --access, give no NAME", 2)
    args.name = f"at {args.access}"


def _mesh(args: argparse.Namespace) -> str:
    """How messages name the mesh: ``mesh 'vmm'`` or ``the mesh at PATH``."""
    return f"mesh {args.name!r}" if args.access is None else f"the mesh at {args.access}"


def run(args: argparse.Namespace) -> int:
    try:
        _positionals(args)
        _check_numbers(args)
        return asyncio.run(_run(args))
    except CliError as exc:
        if args.debug:
            raise
        print(f"meshipc {args.cmd}: {term(exc)}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:
        # the reader left (`meshipc top NAME | head`): end quietly, as a C tool
        # killed by SIGPIPE would; stdout goes nowhere so the exit flush is silent
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 130
    except (MeshError, OSError, ValueError, TypeError, RecursionError) as exc:
        # the last line of defence for what a peer's answer can still provoke
        if args.debug:
            raise
        print(
            f"meshipc {args.cmd}: failed: {type(exc).__name__}: {term(exc)} (--debug shows where)",
            file=sys.stderr,
        )
        return 1


def _check_numbers(args: argparse.Namespace) -> None:
    """Seconds must be finite and positive, counts and levels not negative
    (argparse takes ``nan``, ``inf`` and ``-1`` as numbers)."""
    for flag, value in (("-t/--timeout", args.timeout), ("--period", getattr(args, "period", 1.0))):
        if not (value > 0 and math.isfinite(value)):
            raise CliError(f"{flag} must be a positive number of seconds, got {value!r}", 2)
    for flag, n in (("-l/--limit", getattr(args, "limit", None)), ("--count", getattr(args, "count", None))):
        if n is not None and n < 0:
            raise CliError(f"{flag} must not be negative, got {n}", 2)


async def _run(args: argparse.Namespace) -> int:
    # attaching has its own bound: a stopped or hung mesh must not hang the command
    bound = max(ATTACH_TIMEOUT, args.timeout)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(bound):
                    if args.access is not None:
                        attaching = connect_tls(args.access, runtime_dir=args.runtime_dir)
                    else:
                        attaching = connect(args.name, runtime_dir=args.runtime_dir)
                    conn = await stack.enter_async_context(attaching)
            except TimeoutError:
                raise CliError(
                    f"{_mesh(args)} did not let us attach within {bound:g} s "
                    "(is its process stopped or overloaded?)"
                ) from None
            if args.cmd == "status":
                return await _status(conn, args)
            if args.cmd == "inspect":
                return await _inspect(conn, args)
            if args.cmd == "log":
                return await _log(conn, args)
            if args.cmd == "top":
                me = bytes(conn.mesh.node_id).hex()
                return await run_top(lambda: _fetch(conn, args, "", None), me, args, term)
            return await _call(conn, args)
    except CliError:
        raise
    except ConnectError as exc:
        if args.access is not None:
            raise CliError(str(exc)) from exc
        raise CliError(_not_running(args, exc)) from exc
    except JoinError as exc:
        raise CliError(f"cannot attach to {_mesh(args)}: {exc}") from exc
    except ValueError as exc:  # a malformed name
        raise CliError(str(exc), 2) from exc


def _not_running(args: argparse.Namespace, exc: ConnectError) -> str:
    try:
        root = runtime_root(args.runtime_dir)
    except (OSError, MeshError):
        root = None
    if "/" in args.name:
        return f"cannot reach the listener {args.name}: {exc.reason}"
    if root is None or RUNS_ELSEWHERE in exc.reason:
        return exc.reason  # an unusable runtime folder, or the mesh runs in another: it says how to fix it
    where = f" (runtime dir {root})"
    if mesh_directory(root, args.name).exists():
        return (
            f"mesh {args.name!r} is not accepting clients{where}: {exc.reason}; "
            "it may have died or have no listener (see `meshipc ls`)"
        )
    return f"no mesh named {args.name!r} is running for uid {os.getuid()}{where}; see `meshipc ls`"


# ------------------------------------------------------------------ call


async def _call(conn: Any, args: argparse.Namespace) -> int:
    try:
        request = _json_arg(args.request, "the request")
    except json.JSONDecodeError as exc:
        raise CliError(f"the request is not valid JSON: {exc}", 2) from None
    try:
        reply = await conn.call(args.service, request, timeout=args.timeout)
    except ServiceNotFound:
        raise CliError(
            f"no service named {args.service!r} in {_mesh(args)}; "
            f"`meshipc status {args.name if args.access is None else '--access ' + args.access}` lists them"
        ) from None
    except RemoteError as exc:
        raise CliError(f"service {args.service!r} failed: {exc.type_name}: {exc.message}") from None
    except NodeFailure as exc:
        raise CliError(f"service {args.service!r} is gone: {exc}") from None
    except TimeoutError:
        raise CliError(f"service {args.service!r} did not answer within {args.timeout:g} s") from None
    except MeshError as exc:
        raise CliError(f"call to {args.service!r} failed: {exc}") from None
    print(_json(plain(reply), indent=2))
    return 0


# ------------------------------------------------------------------ log


async def _log(conn: Any, args: argparse.Namespace) -> int:
    if len(args.what) > 2:
        raise CliError("give at most a worker and a level, e.g. `meshipc log vmm ticker DEBUG`", 2)
    worker, level = ("*", args.what[0]) if len(args.what) == 1 else args.what
    try:
        level_number(level)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    mesh = await _fetch(conn, args, "mesh", None)
    root = mesh.get("root") if isinstance(mesh, dict) else None
    if not isinstance(root, str):
        raise CliError("the mesh root sent a malformed answer (no root node id)")
    try:
        new = await conn.inspect_update(
            f"nodes/{root}/log_levels",
            {"worker": worker, "level": level, "logger": args.logger},
            args.timeout,
        )
    except RemoteError as exc:
        raise CliError(f"cannot set the log level: {exc.message}") from None
    except (LookupError, MeshError) as exc:
        raise CliError(f"cannot set the log level: {exc}") from None
    print(render(plain(new)) if new else "(no workers)")
    return 0


# ------------------------------------------------------------------ inspect


async def _fetch(conn: Any, args: argparse.Namespace, path: str, depth: int | None) -> Any:
    try:
        return plain(
            await conn.inspect(path, depth, args.timeout, sensitive=getattr(args, "sensitive", False))
        )
    except LookupError:
        raise CliError(f"no inspect entry {path!r} in {_mesh(args)}") from None
    except MeshError as exc:
        raise CliError(f"inspect failed: {exc}") from None


async def _inspect(conn: Any, args: argparse.Namespace) -> int:
    if args.update is not None:
        try:
            value = _json_arg(args.update, "the value")
        except json.JSONDecodeError:
            value = args.update
        try:
            new = await conn.inspect_update(args.path, value, args.timeout)
        except LookupError as exc:
            raise CliError(f"cannot update {args.path!r}: {exc}") from None
        except RemoteError as exc:
            raise CliError(f"cannot update {args.path!r}: {exc.message}") from None
        except MeshError as exc:
            raise CliError(f"cannot update {args.path!r}: {exc}") from None
        new = plain(new)
        print(_json(new, indent=2) if args.json else render(new))
        return 0
    if args.limit is not None:
        depth: int | None = args.limit
    elif args.recursive:
        depth = None
    else:
        depth = 1
    if not args.poll:
        tree = await _fetch(conn, args, args.path, depth)
        if args.json:
            print(_json(tree, indent=2))
        else:
            print(render(tree))
        return 0
    prev: Any = None
    t_prev = 0.0
    n = 0
    me = bytes(conn.mesh.node_id).hex()
    labels: dict[str, str] = {}
    in_place = sys.stdout.isatty()
    while args.count is None or n < args.count:
        if n:
            await asyncio.sleep(args.period)
        tree = await _fetch(conn, args, args.path, depth)
        now = time.monotonic()
        rates = _rates(prev, tree, now - t_prev) if prev is not None else None
        if args.json:
            print(_json({"time": time.time(), "tree": tree, "rates": rates}), flush=True)
        else:
            # nodes by name, without this command's own node; redrawn in place on a terminal
            labels.update(node_labels(tree if args.path.strip("/") == "nodes" else _dict(tree).get("nodes")))
            if any(k not in labels for k in node_ids(tree)):  # new nodes, their names not in this part
                labels.update(node_labels(await _fetch(conn, args, "nodes", 2)))
            shown, shown_rates = named(tree, me, labels), named(rates, me, labels)
            head = f"meshipc inspect {args.name} {args.path} - {time.strftime('%H:%M:%S')}"
            print(f"{HOME}{term(head)}" if in_place else f"--- {time.strftime('%H:%M:%S')}")
            print(render(shown, shown_rates), flush=True)
        prev, t_prev = tree, now
        n += 1
    return 0


_NODE_ID = re.compile(r"[0-9a-f]{32}")


def node_ids(value: Any, depth: int = 0) -> Iterator[str]:
    """The keys of ``value`` (at any depth) that look like node ids."""
    if isinstance(value, dict) and depth < MAX_DEPTH:
        for k, v in value.items():
            if isinstance(k, str) and _NODE_ID.fullmatch(k):
                yield k
            yield from node_ids(v, depth + 1)


def _dict(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def node_labels(nodes: Any) -> dict[str, str]:
    """Node id -> ``"name (pid N)"`` for the nodes of an inspect answer's
    ``nodes`` part (``#<id prefix>`` added where names repeat)."""
    if not isinstance(nodes, dict):
        return {}
    out: dict[str, str] = {}
    names = [n.get("name") for n in nodes.values() if isinstance(n, dict)]
    for nid, n in nodes.items():
        if isinstance(n, dict) and isinstance(n.get("name"), str) and isinstance(nid, str):
            label = f"{n['name']} (pid {n.get('pid', '?')})"
            out[nid] = label if names.count(n["name"]) == 1 else f"{label} #{nid[:6]}"
    return out


def named(value: Any, me: str, labels: dict[str, str], depth: int = 0) -> Any:
    """``value`` with node ids as keys replaced by their labels, and this
    command's own node (``me``) left out."""
    if not isinstance(value, dict) or depth >= MAX_DEPTH:
        return value
    return {labels.get(k, k): named(v, me, labels, depth + 1) for k, v in value.items() if k != me}


def _rates(old: Any, new: Any, dt: float) -> Any:
    """Counters of ``new`` as per-second rates against ``old`` (same shape)."""
    if isinstance(new, dict) and "$counter" in new and len(new) == 1:
        if isinstance(old, dict) and isinstance(old.get("$counter"), int) and dt > 0:
            return (new["$counter"] - old["$counter"]) / dt
        return None
    if isinstance(new, dict) and isinstance(old, dict):
        out = {k: _rates(old.get(k), v, dt) for k, v in new.items()}
        return {k: v for k, v in out.items() if v is not None} or None
    return None


def render(tree: Any, rates: Any = None, indent: int = 0) -> str:
    """The tree (``plain`` data) for a terminal: one ``key: value`` per
    line, nested by indent; every key and string escaped (``term``)."""
    lines: list[str] = []
    _render(tree, rates, indent, lines, None)
    return "\n".join(lines)


def _leaf(value: Any, rate: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        ((k, v),) = value.items()
        if k == "$counter" and isinstance(v, (int, float)):
            return f"{v}" + (f" ({rate:+.1f}/s)" if isinstance(rate, float) else "")
        if k == "$more" and isinstance(v, int):
            return f"{{{v} more; -r or -l to expand}}" if v else "{...}"
        if k == "$unresolved":
            return f"<unresolved: {term(v)}>"
    if isinstance(value, dict):
        return "{}" if not value else None
    if isinstance(value, list):
        return _json(value) if all(not isinstance(x, (dict, list)) for x in value) else None
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e6 else f"{value:.1f}"
    return term(value)


def _render(value: Any, rate: Any, indent: int, lines: list[str], key: str | None) -> None:
    pad = "  " * indent
    key = None if key is None else term(key)
    leaf = _leaf(value, rate)
    if leaf is not None:
        lines.append(f"{pad}{key}: {leaf}" if key is not None else f"{pad}{leaf}")
        return
    if key is not None:
        lines.append(f"{pad}{key}:")
        indent += 1
    if isinstance(value, dict):
        if "$unresolved" in value:
            lines.append(f"{'  ' * indent}<unresolved: {term(value['$unresolved'])}>")
        for k, v in value.items():
            if k == "$unresolved":
                continue
            r = rate.get(k) if isinstance(rate, dict) else None
            _render(v, r, indent, lines, k)
    else:
        for i, v in enumerate(value):
            _render(v, None, indent, lines, f"[{i}]")


# ------------------------------------------------------------------ status


def _malformed(what: str, value: Any) -> str:
    return f"<malformed answer: {what} is {type(value).__name__}>"


def _text(d: dict[str, Any], key: str, default: str = "?") -> str:
    """Field ``key`` of a peer's record, for a terminal."""
    v = d.get(key, default)
    return term(v) if isinstance(v, (str, int, float)) and not isinstance(v, bool) else _malformed(key, v)


def _node_summary(nid: str, n: Any) -> tuple[str, dict[str, Any]]:
    """One node's part of ``status``: its role and what it lists. A
    malformed answer gives role ``"?"`` and an ``error`` in its place."""
    if not isinstance(n, dict):
        return "?", {"error": f"node {term(nid[:12])}: {_malformed('its answer', n)}"}
    role = n.get("role", "?")
    role = role if isinstance(role, str) else "?"
    out: dict[str, Any] = {"name": _text(n, "name"), "pid": _text(n, "pid")}
    if "$unresolved" in n:
        out["unresolved"] = f"{term(nid[:12])} ({out['name']}, pid {out['pid']}): {term(n['$unresolved'])}"
    workers = n.get("workers") or {}
    if isinstance(workers, dict):
        out["workers"] = [w for w in workers.values() if isinstance(w, dict)]
        if len(out["workers"]) != len(workers):
            out["error"] = f"node {term(nid[:12])}: a worker record is malformed"
    else:
        out["workers"] = []
        out["error"] = f"node {term(nid[:12])}: {_malformed('workers', workers)}"
    return role, out


async def _status(conn: Any, args: argparse.Namespace) -> int:
    tree = await _fetch(conn, args, "", None)
    me = bytes(conn.mesh.node_id).hex()
    mesh = tree.get("mesh") if isinstance(tree, dict) else None
    all_nodes = tree.get("nodes") if isinstance(tree, dict) else None
    services = tree.get("services") if isinstance(tree, dict) else None
    if not isinstance(mesh, dict) or not isinstance(all_nodes, dict) or not isinstance(services, dict):
        raise CliError("the mesh root sent a malformed answer (no mesh, nodes or services record)")
    nodes = {k: v for k, v in all_nodes.items() if k != me}
    roles: dict[str, int] = {}
    workers: list[dict[str, Any]] = []
    clients: list[dict[str, Any]] = []
    unresolved: list[str] = []
    errors: list[str] = []
    shown: dict[str, dict[str, Any]] = {}
    for nid, n in nodes.items():
        role, info = _node_summary(nid, n)
        shown[nid] = info
        roles[role] = roles.get(role, 0) + 1
        if "unresolved" in info:
            unresolved.append(info["unresolved"])
        if "error" in info:
            errors.append(info["error"])
        if role == "client":
            clients.append({"node": nid, "pid": info["pid"], "name": info["name"]})
        workers.extend(info["workers"])
    summary = {
        "name": mesh.get("name"),
        "pid": mesh.get("pid"),
        "uid": mesh.get("uid"),
        "executable": mesh.get("executable"),
        "uptime": mesh.get("uptime"),
        "directory": mesh.get("directory"),
        "nodes": len(nodes),
        "roles": roles,
        "workers": workers,
        "services": services,
        "clients": clients,
        "unresolved": unresolved,
        "errors": errors,
    }
    if args.json:
        print(_json(summary, indent=2))
        return 0
    by_role = ", ".join(f"{v} {term(k)}" for k, v in sorted(roles.items()))
    uptime = mesh.get("uptime")
    up = _duration(uptime) if isinstance(uptime, (int, float)) else _malformed("uptime", uptime)
    out = [
        f"mesh       {_text(mesh, 'name')}",
        f"pid        {_text(mesh, 'pid')} (uid {_text(mesh, 'uid')})",
        f"executable {_text(mesh, 'executable')}",
        f"uptime     {up}",
        f"directory  {_text(mesh, 'directory')}",
        f"nodes      {len(nodes)} ({by_role})",
    ]
    out.append(f"workers    {len(workers)}")
    for w in workers:
        rc = w.get("returncode")
        state = _text(w, "state") if rc is None else f"exited {term(rc)}"
        out.append(f"  {_text(w, 'name')}  pid {_text(w, 'pid')}  {state}{_restarts(w)}")
    out.append(f"services   {len(services)}")
    for name, sv in services.items():
        if not isinstance(sv, dict):
            out.append(f"  {term(name)}  {_malformed('its record', sv)}")
            continue
        node = sv.get("node")
        where = shown.get(node, {}) if isinstance(node, str) else {}
        types = f"{term(sv.get('request_type') or 'any')} -> {term(sv.get('reply_type') or 'any')}"
        out.append(f"  {term(name)}  on {where.get('name', '?')} (pid {where.get('pid', '?')})  {types}")
    out.append(f"clients    {len(clients)} other than this one")
    for c in clients:
        out.append(f"  {c['name']}  pid {c['pid']}")
    for u in unresolved:
        out.append(f"unresolved {u}")
    for e in errors:
        out.append(f"error      {e}")
    print("\n".join(out))
    return 0


def _restarts(w: dict[str, Any]) -> str:
    """A worker's restart count and its latest restart event, if any."""
    n = w.get("restarts")
    if not isinstance(n, int) or isinstance(n, bool) or (n <= 0 and not w.get("restart_events")):
        return ""
    text = f"  restarts {n}"
    events = w.get("restart_events")
    if isinstance(events, list) and events and isinstance(events[-1], dict):
        text += f" (last: {_text(events[-1], 'kind')}, {_text(events[-1], 'reason')})"
    return text


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return term(s)
    s = float(s)
    if s < 120:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"
