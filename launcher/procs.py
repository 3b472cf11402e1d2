"""Process bookkeeping shared by the supervisor and the node agent (Linux /proc): find a
process tree, signal only processes we started (pid + start time), tear down without orphans.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path

log = logging.getLogger("meshplan.procs")


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time in clock ticks, state) of a live process, from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "(comm) ": state, ppid, ...
    return int(fields[1]), int(fields[19]), fields[0]


def process_tree(pid: int) -> dict[int, int]:
    """`pid` and its live descendants -> their start times. torchrun starts its workers in
    their own sessions, so killing torchrun's process group alone would orphan them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        info = _stat(int(entry.name)) if entry.name.isdigit() else None
        if info is not None:
            children.setdefault(info[0], []).append(int(entry.name))
    out: dict[int, int] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        info = _stat(p)
        if info is None or p in out:
            continue
        out[p] = info[1]
        todo.extend(children.get(p, []))
    return out


def _signal_known(known: dict[int, int], sig: int) -> None:
    """Signal each process we started (same pid *and* start time, so a recycled pid is never
    hit), and the process group it leads."""
    own_group = os.getpgrp()
    for pid, started in known.items():
        info = _stat(pid)
        if info is None or info[1] != started or info[2] == "Z":
            continue
        try:
            if os.getpgid(pid) == pid != own_group:  # a session/group leader: its whole group
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def teardown(procs: list[subprocess.Popen], known: dict[int, int], grace_s: float) -> None:
    """SIGTERM every node process (torchrun forwards it to its workers) and every process we
    saw under them, then SIGKILL whatever is left after `grace_s`: no orphans."""
    known = dict(known)
    for proc in procs:
        known.update(process_tree(proc.pid))
    _signal_known(known, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass
    _signal_known(known, signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("node process %d did not exit after SIGKILL", proc.pid)
