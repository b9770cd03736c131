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
import os
import sys
import time
from typing import Any

from ._errors import ConnectError, JoinError, MeshError, NodeFailure, RemoteError, ServiceNotFound
from ._mesh import connect
from ._names import mesh_directory, runtime_root

#: Default seconds each node gets to answer ``status`` and ``inspect``.
DEFAULT_TIMEOUT = 1.0
#: Default seconds ``call`` waits for the service's reply.
CALL_TIMEOUT = 10.0
#: Seconds to attach to the mesh before giving up (at least the -t timeout).
ATTACH_TIMEOUT = 2.0


class CliError(Exception):
    """One line for the user; exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def add_commands(sub: Any) -> None:
    """Add the control-plane subcommands to the ``meshipc`` parser."""
    common = argparse.ArgumentParser(add_help=False)  # every command
    common.add_argument(
        "--runtime-dir", metavar="DIR", help="runtime folder holding the meshes (default: as Mesh)"
    )
    common.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    common.add_argument("name", metavar="NAME", help="name of a running mesh (see `meshipc ls`)")
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
        description="Attach to the mesh NAME and summarize it.",
    )
    st.add_argument("-j", "--json", action="store_true", help="print the summary as JSON")

    ins = sub.add_parser(
        "inspect",
        parents=[common, asks_nodes],
        help="show the live inspect tree of a running mesh",
        description="Attach to the mesh NAME and print its inspect tree (or the part at PATH, "
        "e.g. nodes/<id prefix>/connections). Counters are marked; with -p they show as rates.",
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
    )
    ca.add_argument("service", metavar="SERVICE", help="service name (see `meshipc status NAME`)")
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


COMMANDS = ("status", "inspect", "call")


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except CliError as exc:
        if args.debug:
            raise
        print(f"meshipc {args.cmd}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace) -> int:
    # attaching has its own bound: a stopped or hung mesh must not hang the command
    bound = max(ATTACH_TIMEOUT, args.timeout)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(bound):
                    conn = await stack.enter_async_context(connect(args.name, runtime_dir=args.runtime_dir))
            except TimeoutError:
                raise CliError(
                    f"mesh {args.name!r} did not let us attach within {bound:g} s "
                    "(is its process stopped or overloaded?)"
                ) from None
            if args.cmd == "status":
                return await _status(conn, args)
            if args.cmd == "inspect":
                return await _inspect(conn, args)
            return await _call(conn, args)
    except CliError:
        raise
    except ConnectError as exc:
        raise CliError(_not_running(args, exc)) from exc
    except JoinError as exc:
        raise CliError(f"cannot attach to mesh {args.name!r}: {exc}") from exc
    except ValueError as exc:  # a malformed name
        raise CliError(str(exc), 2) from exc


def _not_running(args: argparse.Namespace, exc: ConnectError) -> str:
    try:
        root = runtime_root(args.runtime_dir)
    except (OSError, MeshError):
        root = None
    if "/" in args.name:
        return f"cannot reach the listener {args.name}: {exc.reason}"
    where = f" (runtime dir {root})" if root is not None else ""
    if root is not None and mesh_directory(root, args.name).exists():
        return (
            f"mesh {args.name!r} is not accepting clients{where}: {exc.reason}; "
            "it may have died or have no listener (see `meshipc ls`)"
        )
    return f"no mesh named {args.name!r} is running for uid {os.getuid()}{where}; see `meshipc ls`"


# ------------------------------------------------------------------ call


async def _call(conn: Any, args: argparse.Namespace) -> int:
    try:
        request = json.loads(args.request)
    except json.JSONDecodeError as exc:
        raise CliError(f"the request is not valid JSON: {exc}", 2) from None
    try:
        reply = await conn.call(args.service, request, timeout=args.timeout)
    except ServiceNotFound:
        raise CliError(
            f"no service named {args.service!r} in mesh {args.name!r}; "
            f"`meshipc status {args.name}` lists them"
        ) from None
    except RemoteError as exc:
        raise CliError(f"service {args.service!r} failed: {exc.type_name}: {exc.message}") from None
    except NodeFailure as exc:
        raise CliError(f"service {args.service!r} is gone: {exc}") from None
    except TimeoutError:
        raise CliError(f"service {args.service!r} did not answer within {args.timeout:g} s") from None
    except MeshError as exc:
        raise CliError(f"call to {args.service!r} failed: {exc}") from None
    print(json.dumps(reply, indent=2, default=_default))
    return 0


def _default(o: Any) -> Any:
    return repr(o)  # handles (ports, fds) have no JSON form


# ------------------------------------------------------------------ inspect


async def _fetch(conn: Any, args: argparse.Namespace, path: str, depth: int | None) -> Any:
    try:
        return await conn.inspect(path, depth, args.timeout, sensitive=getattr(args, "sensitive", False))
    except LookupError:
        raise CliError(f"no inspect entry {path!r} in mesh {args.name!r}") from None
    except MeshError as exc:
        raise CliError(f"inspect failed: {exc}") from None


async def _inspect(conn: Any, args: argparse.Namespace) -> int:
    if args.update is not None:
        try:
            value = json.loads(args.update)
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
        print(json.dumps(new, indent=2) if args.json else render(new))
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
            print(json.dumps(tree, indent=2))
        else:
            print(render(tree))
        return 0
    prev: Any = None
    t_prev = 0.0
    n = 0
    while args.count is None or n < args.count:
        if n:
            await asyncio.sleep(args.period)
        tree = await _fetch(conn, args, args.path, depth)
        now = time.monotonic()
        rates = _rates(prev, tree, now - t_prev) if prev is not None else None
        if args.json:
            print(json.dumps({"time": time.time(), "tree": tree, "rates": rates}), flush=True)
        else:
            print(f"--- {time.strftime('%H:%M:%S')}")
            print(render(tree, rates), flush=True)
        prev, t_prev = tree, now
        n += 1
    return 0


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
    """The tree for a terminal: one ``key: value`` per line, nested by indent."""
    lines: list[str] = []
    _render(tree, rates, indent, lines, None)
    return "\n".join(lines)


def _leaf(value: Any, rate: Any) -> str | None:
    if isinstance(value, dict) and len(value) == 1:
        ((k, v),) = value.items()
        if k == "$counter":
            return f"{v}" + (f" ({rate:+.1f}/s)" if isinstance(rate, float) else "")
        if k == "$more":
            return f"{{{v} more; -r or -l to expand}}" if v else "{...}"
        if k == "$unresolved":
            return f"<unresolved: {v}>"
    if isinstance(value, dict):
        return "{}" if not value else None
    if isinstance(value, list):
        return json.dumps(value) if all(not isinstance(x, (dict, list)) for x in value) else None
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e6 else f"{value:.1f}"
    return json.dumps(value) if isinstance(value, str) and not value.isprintable() else str(value)


def _render(value: Any, rate: Any, indent: int, lines: list[str], key: str | None) -> None:
    pad = "  " * indent
    leaf = _leaf(value, rate)
    if leaf is not None:
        lines.append(f"{pad}{key}: {leaf}" if key is not None else f"{pad}{leaf}")
        return
    if key is not None:
        lines.append(f"{pad}{key}:")
        indent += 1
    if isinstance(value, dict):
        if "$unresolved" in value:
            lines.append(f"{'  ' * indent}<unresolved: {value['$unresolved']}>")
        for k, v in value.items():
            if k == "$unresolved":
                continue
            r = rate.get(k) if isinstance(rate, dict) else None
            _render(v, r, indent, lines, k)
    else:
        for i, v in enumerate(value):
            _render(v, None, indent, lines, f"[{i}]")


# ------------------------------------------------------------------ status


async def _status(conn: Any, args: argparse.Namespace) -> int:
    tree = await _fetch(conn, args, "", None)
    me = bytes(conn.mesh.node_id).hex()
    mesh = tree["mesh"]
    nodes = {k: v for k, v in tree["nodes"].items() if k != me}
    roles: dict[str, int] = {}
    workers: list[dict[str, Any]] = []
    clients: list[dict[str, Any]] = []
    unresolved: list[str] = []
    for nid, n in nodes.items():
        role = str(n.get("role", "?"))
        roles[role] = roles.get(role, 0) + 1
        if "$unresolved" in n:
            unresolved.append(
                f"{nid[:12]} ({n.get('name', '?')}, pid {n.get('pid', '?')}): {n['$unresolved']}"
            )
        if role == "client":
            clients.append({"node": nid, "pid": n.get("pid"), "name": n.get("name")})
        for w in (n.get("workers") or {}).values():
            workers.append(w)
    summary = {
        "name": mesh["name"],
        "pid": mesh["pid"],
        "uid": mesh["uid"],
        "executable": mesh["executable"],
        "uptime": mesh["uptime"],
        "directory": mesh["directory"],
        "nodes": len(nodes),
        "roles": roles,
        "workers": workers,
        "services": tree["services"],
        "clients": clients,
        "unresolved": unresolved,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    by_role = ", ".join(f"{v} {k}" for k, v in sorted(roles.items()))
    out = [
        f"mesh       {mesh['name']}",
        f"pid        {mesh['pid']} (uid {mesh['uid']})",
        f"executable {mesh['executable']}",
        f"uptime     {_duration(mesh['uptime'])}",
        f"directory  {mesh['directory']}",
        f"nodes      {len(nodes)} ({by_role})",
    ]
    out.append(f"workers    {len(workers)}")
    for w in workers:
        state = w["state"] if w.get("returncode") is None else f"exited {w['returncode']}"
        out.append(f"  {w['name']}  pid {w['pid']}  {state}")
    out.append(f"services   {len(tree['services'])}")
    for name, s in tree["services"].items():
        where = nodes.get(s["node"], {})
        types = f"  {s['request_type'] or 'any'} -> {s['reply_type'] or 'any'}"
        out.append(f"  {name}  on {where.get('name', '?')} (pid {where.get('pid', '?')}){types}")
    out.append(f"clients    {len(clients)} other than this one")
    for c in clients:
        out.append(f"  {c['name']}  pid {c['pid']}")
    for u in unresolved:
        out.append(f"unresolved {u}")
    print("\n".join(out))
    return 0


def _duration(s: float) -> str:
    s = float(s)
    if s < 120:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"
