"""``meshipc top NAME``: a live view of a running mesh in a terminal.

One row per node of the mesh (workers, the root, attached clients; never
the command's own node), from the mesh's inspect tree and, for CPU and
memory, from ``/proc`` of the node's process (nodes run on this host):
pid, CPU %, RSS, messages and bytes per second in and out, messages queued
unread, messages sent and not yet consumed by their receivers (the
flow-control windows in use), calls pending in its services, and its
services with their call and error rates.

On a terminal the table is redrawn in place on the alternate screen
(``q`` quits, ``s`` changes the sort key; Ctrl-C too, and either way the
terminal is left as it was); otherwise (a pipe) it prints one table per
period. Plain text only: no terminal library is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

#: Sort keys (``--sort`` and the ``s`` key cycle through them, in order).
SORT_KEYS: Final = ("cpu", "rss", "in", "out", "bytes", "queued", "name", "pid")
#: Escape sequences: alternate screen on/off, cursor hidden/shown, home and clear.
ENTER: Final = "\x1b[?1049h\x1b[?25l"
LEAVE: Final = "\x1b[?25h\x1b[?1049l"
HOME: Final = "\x1b[H\x1b[2J"
_TICK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def proc_sample(pid: int) -> tuple[float, int] | None:
    """CPU seconds used so far and resident bytes of process ``pid``, or
    None (gone, not Linux, another user's)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            statm = f.read().split()
        fields = stat[stat.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _TICK, int(statm[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _num(v: Any) -> float:
    """A counter (``{"$counter": n}``) or a number from a peer's answer; 0 otherwise."""
    if isinstance(v, dict):
        v = v.get("$counter")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


@dataclass
class Row:
    node: str
    name: str
    role: str
    pid: int
    cpu: float | None = None
    rss: int | None = None
    msgs_in: float = 0.0
    msgs_out: float = 0.0
    bytes_in: float = 0.0
    bytes_out: float = 0.0
    queued: int = 0
    unconsumed: int = 0
    calls: int = 0
    services: list[str] = field(default_factory=list)


def _totals(n: dict[str, Any]) -> dict[str, float]:
    """A node's counters that become rates: its links' sums, its services'."""
    out = {"mi": 0.0, "mo": 0.0, "bi": 0.0, "bo": 0.0}
    conns = n.get("connections")
    for c in conns.values() if isinstance(conns, dict) else ():
        out["mi"] += _num(_get(c, "messages_in"))
        out["mo"] += _num(_get(c, "messages_out"))
        out["bi"] += _num(_get(c, "bytes_in"))
        out["bo"] += _num(_get(c, "bytes_out"))
    services = n.get("services")
    for s, sv in services.items() if isinstance(services, dict) else ():
        out[f"c:{s}"] = _num(_get(sv, "calls"))
        out[f"e:{s}"] = _num(_get(sv, "errors"))
    return out


class Sampler:
    """Turns successive inspect trees into rows with rates (per second,
    against the previous sample of the same node)."""

    def __init__(self, me: str) -> None:
        self.me = me
        self._prev: dict[str, tuple[float, dict[str, float]]] = {}
        self._cpu: dict[int, tuple[float, float]] = {}

    def rows(self, tree: Any, now: float) -> list[Row]:
        nodes = _get(tree, "nodes")
        rows: list[Row] = []
        seen: dict[str, tuple[float, dict[str, float]]] = {}
        cpu_now: dict[int, tuple[float, float]] = {}
        for nid, n in nodes.items() if isinstance(nodes, dict) else ():
            if nid == self.me or not isinstance(n, dict):
                continue
            pid = n.get("pid")
            pid = pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else 0
            name, role = n.get("name"), n.get("role")
            row = Row(
                str(nid), name if isinstance(name, str) else "?", role if isinstance(role, str) else "?", pid
            )
            totals = _totals(n)
            seen[nid] = (now, totals)
            prev = self._prev.get(nid)
            if prev is not None and now > prev[0]:
                dt = now - prev[0]
                rate = {k: max(0.0, (v - prev[1].get(k, v)) / dt) for k, v in totals.items()}
                row.msgs_in, row.msgs_out = rate["mi"], rate["mo"]
                row.bytes_in, row.bytes_out = rate["bi"], rate["bo"]
            else:
                rate = {}
            ports = n.get("ports")
            row.queued = int(_num(_get(ports, "queued_messages")))
            row.unconsumed = int(_num(_get(ports, "unconsumed_out_messages")))
            services = n.get("services")
            for s, sv in services.items() if isinstance(services, dict) else ():
                row.calls += int(_num(_get(sv, "active")) + _num(_get(sv, "waiting")))
                calls, errs = rate.get(f"c:{s}"), rate.get(f"e:{s}")
                extra = f" {calls:.0f}/s" if calls is not None else ""
                extra += f" {errs:.0f} err/s" if errs else ""
                row.services.append(f"{s}{extra}")
            if pid:
                sample = cpu_now.get(pid) or proc_sample(pid)
                if sample is not None:
                    cpu_now[pid] = sample
                    row.rss = int(sample[1])
                    before = self._cpu.get(pid)
                    if before is not None and now > before[0]:
                        row.cpu = 100.0 * max(0.0, sample[0] - before[1]) / (now - before[0])
            rows.append(row)
        self._prev = seen
        self._cpu = {pid: (now, s[0]) for pid, s in cpu_now.items()}
        return rows


def sort_rows(rows: list[Row], key: str) -> list[Row]:
    if key == "name":
        return sorted(rows, key=lambda r: (r.name, r.pid))
    if key == "pid":
        return sorted(rows, key=lambda r: r.pid)
    picks: dict[str, Callable[[Row], float]] = {
        "cpu": lambda r: r.cpu or 0.0,
        "rss": lambda r: float(r.rss or 0),
        "in": lambda r: r.msgs_in,
        "out": lambda r: r.msgs_out,
        "bytes": lambda r: r.bytes_in + r.bytes_out,
        "queued": lambda r: float(r.queued + r.unconsumed),
    }
    pick = picks[key]
    return sorted(rows, key=lambda r: (-pick(r), r.name))


def _si(v: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(v) < 1000:
            return f"{v:.0f}{unit}" if unit == "" or v >= 100 else f"{v:.1f}{unit}"
        v /= 1000
    return f"{v:.0f}T"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}M"


HEADER: Final = (
    f"{'NAME':<16} {'ROLE':<8} {'PID':>7} {'CPU%':>6} {'RSS':>7} {'MSG/s IN':>9} {'OUT':>7} "
    f"{'B/s IN':>7} {'OUT':>7} {'QUEUED':>6} {'UNACK':>6} {'CALLS':>5}  SERVICES"
)


def table(rows: list[Row], title: str, sort: str, width: int, term: Callable[[Any], str] = str) -> str:
    """The screen: a title line, the header, one line per row (cut at
    ``width``); what a peer named goes through ``term`` (the command's
    escaping of anything a peer sends)."""
    lines = [title, HEADER]
    for r in sort_rows(rows, sort):
        cpu = "-" if r.cpu is None else f"{r.cpu:.1f}"
        lines.append(
            f"{term(r.name)[:16]:<16} {term(r.role)[:8]:<8} {r.pid:>7} {cpu:>6} {_mib(r.rss):>7} "
            f"{_si(r.msgs_in):>9} {_si(r.msgs_out):>7} {_si(r.bytes_in):>7} {_si(r.bytes_out):>7} "
            f"{r.queued:>6} {r.unconsumed:>6} {r.calls:>5}  {term(', '.join(r.services))}"
        )
    if not rows:
        lines.append("(no other node in the mesh)")
    return "\n".join(line[:width] for line in lines)


@contextlib.contextmanager
def screen(fd: int, out: Any) -> Iterator[None]:
    """The terminal in cbreak mode (keys one at a time, no echo; Ctrl-C
    still interrupts) on the alternate screen, put back however we leave."""
    import termios  # POSIX only: imported when a terminal is driven
    import tty

    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        out.write(ENTER)
        out.flush()
        yield
    finally:
        out.write(LEAVE)
        out.flush()
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


async def run_top(
    fetch: Callable[[], Awaitable[Any]], me: str, args: argparse.Namespace, term: Callable[[Any], str]
) -> int:
    """Poll ``fetch()`` (the mesh's inspect tree) every ``args.period`` s
    and draw, without the node ``me``; returns the exit status."""
    sampler = Sampler(me)
    sort = args.sort
    out = sys.stdout
    live = out.isatty() and sys.stdin.isatty()
    keys: asyncio.Queue[str] = asyncio.Queue(maxsize=64)
    loop = asyncio.get_running_loop()
    with contextlib.ExitStack() as stack:
        if live:
            fd = sys.stdin.fileno()
            stack.enter_context(screen(fd, out))

            def on_key() -> None:
                data = os.read(fd, 64).decode(errors="replace")
                for ch in data:
                    with contextlib.suppress(asyncio.QueueFull):
                        keys.put_nowait(ch)

            loop.add_reader(fd, on_key)
            stack.callback(loop.remove_reader, fd)
        n = 0
        while args.count is None or n < args.count:
            tree = await fetch()
            rows = sampler.rows(tree, time.monotonic())
            mesh = _get(tree, "mesh")
            name = _get(mesh, "name") or args.name
            nodes = f"{len(rows)} node" + ("" if len(rows) == 1 else "s")
            title = f"meshipc top {name} - {time.strftime('%H:%M:%S')} - {nodes} - sort: {sort}" + (
                " (s: sort, q: quit)" if live else ""
            )
            width = shutil.get_terminal_size().columns if live else 200
            text = table(rows, term(title), sort, width, term)
            if live:
                out.write(HOME + text.replace("\n", "\r\n"))
            else:
                out.write(text + "\n\n")
            out.flush()
            n += 1
            if args.count is not None and n >= args.count:
                break
            try:
                async with asyncio.timeout(args.period):
                    while True:
                        ch = await keys.get()
                        if ch in "qQ":
                            return 0
                        if ch in "sS":
                            sort = SORT_KEYS[(SORT_KEYS.index(sort) + 1) % len(SORT_KEYS)]
                            break
            except TimeoutError:
                pass
    return 0
