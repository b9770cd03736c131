"""The ``meshipc`` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from . import __version__
from ._ctlcli import COMMANDS, RUNTIME_DIR_HELP, RawEpilog, add_commands
from ._ctlcli import run as run_control
from ._demo import service
from ._errors import MeshError
from ._names import (
    LISTENER_NAME,
    mesh_directory,
    name_is_live,
    named_meshes,
    prune_stale,
    prune_unnamed,
    runtime_location,
)
from ._platform import PLATFORM
from ._sockets import is_socket_alive


def _ls(runtime_dir: str | None, prune: bool = False) -> int:
    root, why = runtime_location(runtime_dir)
    if prune:
        for name in prune_stale(root):
            print(f"{name}\tpruned")
        for directory in prune_unnamed(root, is_socket_alive):
            print(f"{directory.name}\tpruned (unnamed)")
    found = False
    for name in named_meshes(root):
        state = "live" if name_is_live(root, name) else "stale"
        directory = mesh_directory(root, name)
        if state == "stale" and not os.path.lexists(directory):
            continue  # a lock file between a clean exit and its removal
        listener = directory / LISTENER_NAME
        extra = f"  listener {listener}" if state == "live" and listener.exists() else ""
        print(f"{name}\t{state}{extra}")
        found = True
    if not found:
        print(f"no named meshes in {root}")
    print(f"(runtime dir {root}: {why})")
    return 0


#: What ``meshipc`` prints under its command list: where to start.
EPILOG = """examples:
  meshipc demo                  a service, a worker and an attaching client, end to end
  meshipc ls                    this user's named meshes
  meshipc status vmm            one screen about the running mesh 'vmm'
  meshipc top vmm               its nodes live: CPU, memory, message rates, queues (q quits)
  meshipc log vmm ticker DEBUG  its worker 'ticker' logs at DEBUG from now on
  meshipc inspect vmm nodes -r  its live inspect tree
  meshipc call vmm double 5     call its service 'double' with the request 5

'meshipc COMMAND --help' describes each command."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="meshipc",
        description="meshipc: a secure inter-process mesh for Python. "
        "Commands to see and drive running meshes of this user.",
        epilog=EPILOG,
        formatter_class=RawEpilog,
    )
    p.add_argument("--version", action="version", version=f"meshipc {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the end-to-end demo: service, worker, attaching control client",
        description="Start a named mesh with a worker serving 'ticker', attach a control client from "
        "another process, and drive the worker through the service; each step prints what it shows.",
        epilog="examples:\n  meshipc demo\n  meshipc demo --hold     "
        "# then try meshipc status/inspect/call in another terminal",
        formatter_class=RawEpilog,
    )
    demo.add_argument(
        "--hold", action="store_true", help="keep the demo mesh running at the end (for the CLI) until Ctrl-C"
    )
    ls = sub.add_parser(
        "ls",
        help="list this user's named meshes",
        description="List this user's named meshes (live or stale) in the runtime folder, and say which "
        "folder that is and why.",
        epilog="examples:\n  meshipc ls\n  meshipc ls --prune     # remove what dead meshes left behind",
        formatter_class=RawEpilog,
    )
    ls.add_argument("--runtime-dir", metavar="DIR", help=RUNTIME_DIR_HELP)
    ls.add_argument("--prune", action="store_true", help="remove what dead meshes (named or not) left behind")

    add_commands(sub)  # status, inspect, call
    args = p.parse_args(argv)
    if args.cmd is None:  # bare `meshipc`: the command list
        p.print_help()
        return 0
    PLATFORM.no_core_dumps()  # a control command holds an invitation: a private key
    if args.cmd in COMMANDS:
        return run_control(args)
    if args.cmd == "demo":
        return asyncio.run(service(args.hold))
    if args.cmd == "ls":
        try:
            return _ls(args.runtime_dir, args.prune)
        except MeshError as exc:
            print(f"meshipc ls: {exc}", file=sys.stderr)
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
