"""The runtime hook a training script calls so that `meshplan run` can watch it.

Usage in a trainer (all calls are no-ops unless MESHPLAN_MONITOR_DIR is set):

    mon = StepMonitor.from_env()
    for step in range(start, steps):
        mon.step_begin(step)
        ...forward/backward...
        with mon.comm("grad_allreduce"):
            dist.all_reduce(...)
        mon.step_end(step, loss=loss.item())
    mon.close()

What it writes, per rank, to MESHPLAN_MONITOR_DIR:

- `rank<R>.jsonl`: one JSON object per event, line buffered (one write() per line, no fsync):
  `start` (rank, local_rank, world, node, pid), `begin` (step), `enter`/`leave` (collective
  name, step; `leave` carries `dur_s`), `end` (step, step_s, comm_s, compute_s, loss),
  `signal` (the rank was told to stop, e.g. torchrun tearing down a node) and `close`.
  Every record has `t`, wall-clock seconds (time.time()), so the supervisor can compare ranks.
- `rank<R>.hb`: a heartbeat file whose mtime a daemon thread refreshes every
  MESHPLAN_HEARTBEAT_S seconds (default 1.0). It keeps beating while the main thread is blocked
  in a collective, so "alive but not progressing" (a hang) is told apart from "dead".

With MESHPLAN_COLLECTOR=HOST:PORT/attempt<K> (set by `meshplan run`) the same records and the
heartbeat go over TCP to the supervisor's collector instead (`launcher.collector`: bounded
buffer, reconnect, losses counted); no shared file system is needed.

Sections: `with mon.section("checkpoint"):` announces a long legitimate pause (checkpoint
save, evaluation); the hang detector then allows it `section_timeout_s` instead of a few step
periods (the NVIDIA Resiliency Extension's "sections" idea).

Collectives the script does not wrap: `mon.hook_collectives()` (called by `from_env` when
torch.distributed is already imported) wraps the torch.distributed collective entry points, so
FSDP2's all-gathers/reduce-scatters, pipelining's batch_isend_irecv and plain calls are timed
and named without the script's help (see `launcher.collective_hooks`).

The `enter` marker is on disk before the rank blocks, so in a hang the rank that never entered
the collective everyone else is waiting in can be named (the idea of the NCCL flight
recorder's "missing ranks"). Durations use time.perf_counter(). No torch import.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .collector import COLLECTOR_ENV, Endpoint, Sender

MONITOR_DIR_ENV = "MESHPLAN_MONITOR_DIR"
NODE_ENV = "MESHPLAN_NODE"
HEARTBEAT_ENV = "MESHPLAN_HEARTBEAT_S"
HOOKS_ENV = "MESHPLAN_HOOK_COLLECTIVES"
"""Set to 0 to keep `from_env` from wrapping torch.distributed's collectives."""
DEFAULT_HEARTBEAT_S = 1.0


def rank_log_path(directory: str | Path, rank: int) -> Path:
    """Where rank `rank` appends its event records."""
    return Path(directory) / f"rank{rank}.jsonl"


def heartbeat_path(directory: str | Path, rank: int) -> Path:
    """The file whose mtime is rank `rank`'s heartbeat."""
    return Path(directory) / f"rank{rank}.hb"


class _NullComm:
    """Context manager that does nothing (monitor disabled)."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_COMM = _NullComm()


class _Comm:
    """Context manager marking time spent waiting in collective `name`."""

    __slots__ = ("_mon", "_name", "_t0")

    def __init__(self, mon: StepMonitor, name: str) -> None:
        self._mon = mon
        self._name = name
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = self._mon._enter(self._name)

    def __exit__(self, *exc: object) -> None:
        self._mon._leave(self._name, self._t0)


class _Section:
    """Context manager announcing a long legitimate pause (`section` records)."""

    __slots__ = ("_mon", "_name", "_t0")

    def __init__(self, mon: StepMonitor, name: str) -> None:
        self._mon = mon
        self._name = name
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()
        self._mon._write({"ev": "section", "name": self._name, "open": True,
                          "step": self._mon._step})

    def __exit__(self, *exc: object) -> None:
        self._mon._write({"ev": "section", "name": self._name, "open": False,
                          "step": self._mon._step, "dur_s": time.perf_counter() - self._t0})


class StepMonitor:
    """Per-rank step/communication recorder. Create with `StepMonitor.from_env()`.

    Not thread-safe for the step/comm calls (call them from the training thread).
    """

    def __init__(self, directory: str | Path | None, rank: int = 0, local_rank: int = 0,
                 world: int = 1, node: str = "", heartbeat_s: float = DEFAULT_HEARTBEAT_S,
                 install_signal_handler: bool = True, collector: Endpoint | None = None) -> None:
        self.enabled = directory is not None or collector is not None
        self.rank, self.local_rank, self.world, self.node = rank, local_rank, world, node
        self._step = -1
        self._step_t0 = 0.0
        self._comm_s = 0.0
        self._depth = 0  # nested comm() blocks count once
        self._file = None
        self._sender: Sender | None = None
        self._lock = threading.RLock()  # async collective completions write from other threads
        self._next_id = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.enabled:
            return
        if collector is not None:
            self._sender = Sender(collector, {"rank": rank}, heartbeat_s=heartbeat_s)
            self._write({"ev": "start", "rank": rank, "local_rank": local_rank, "world": world,
                         "node": node, "pid": os.getpid(), "transport": "tcp"})
            if install_signal_handler:
                self._install_sigterm()
            return
        path = Path(directory)
        self._hb = heartbeat_path(path, rank)
        try:
            path.mkdir(parents=True, exist_ok=True)
            # buffering=1: line buffered, so each record reaches the OS as one write(); no fsync.
            self._file = open(rank_log_path(path, rank), "a", buffering=1, encoding="utf-8")
        except OSError as exc:  # monitoring must never stop training
            print(f"meshplan monitor disabled: cannot write {path}: {exc}", file=sys.stderr)
            self.enabled = False
            return
        self._write({"ev": "start", "rank": rank, "local_rank": local_rank, "world": world,
                     "node": node, "pid": os.getpid()})
        self._beat()
        self._thread = threading.Thread(target=self._heartbeat_loop, args=(heartbeat_s,),
                                        name="meshplan-heartbeat", daemon=True)
        self._thread.start()
        if install_signal_handler:
            self._install_sigterm()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> StepMonitor:
        """Build from RANK, LOCAL_RANK, WORLD_SIZE, MESHPLAN_NODE (default: hostname) and
        MESHPLAN_MONITOR_DIR; a disabled no-op monitor when MESHPLAN_MONITOR_DIR is unset."""
        env = os.environ if environ is None else environ
        directory = env.get(MONITOR_DIR_ENV) or None
        collector = None
        if env.get(COLLECTOR_ENV):
            try:
                collector = Endpoint.parse(env[COLLECTOR_ENV])
            except ValueError as exc:  # monitoring must never stop training
                print(f"meshplan monitor: {exc}; using {MONITOR_DIR_ENV}", file=sys.stderr)
        if directory is None and collector is None:
            return cls(None)
        mon = cls(directory, rank=int(env.get("RANK", "0")),
                  local_rank=int(env.get("LOCAL_RANK", "0")),
                  world=int(env.get("WORLD_SIZE", "1")),
                  node=env.get(NODE_ENV) or socket.gethostname(),
                  heartbeat_s=float(env.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)),
                  install_signal_handler=threading.current_thread() is threading.main_thread(),
                  collector=collector)
        if "torch.distributed" in sys.modules and env.get(HOOKS_ENV, "1") != "0":
            mon.hook_collectives()
        return mon

    # -- the training-loop API ------------------------------------------------------------

    def step_begin(self, step: int) -> None:
        """Mark the start of step `step`."""
        if not self.enabled:
            return
        self._step, self._comm_s, self._depth = step, 0.0, 0
        self._step_t0 = time.perf_counter()
        self._write({"ev": "begin", "step": step})

    def comm(self, name: str) -> _Comm | _NullComm:
        """`with mon.comm("allreduce"):` marks time spent waiting in a collective."""
        return _Comm(self, name) if self.enabled else _NULL_COMM

    def section(self, name: str) -> _Section | _NullComm:
        """`with mon.section("checkpoint"):` announces a long legitimate pause (no hang)."""
        return _Section(self, name) if self.enabled else _NULL_COMM

    def hook_collectives(self) -> bool:
        """Time every torch.distributed collective from now on (see launcher.collective_hooks);
        False if torch.distributed is unavailable."""
        if not self.enabled:
            return False
        from .collective_hooks import install

        return install(self)

    def step_end(self, step: int, loss: float | None = None) -> None:
        """Mark the end of step `step`; records step, comm and compute seconds."""
        if not self.enabled:
            return
        step_s = time.perf_counter() - self._step_t0
        with self._lock:
            comm_s = min(self._comm_s, step_s)
        rec = {"ev": "end", "step": step, "step_s": step_s, "comm_s": comm_s,
               "compute_s": max(step_s - comm_s, 0.0)}
        if loss is not None:
            rec["loss"] = float(loss)
        self._write(rec)

    def close(self) -> None:
        """Write the `close` record and stop the heartbeat; safe to call twice."""
        if not self.enabled or (self._file is None and self._sender is None):
            return
        from .collective_hooks import uninstall

        uninstall(self)
        self._stop.set()
        self._write({"ev": "close"})
        if self._sender is not None:
            self._sender.close(timeout_s=5.0)
            self._sender = None
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def dropped_records(self) -> int:
        """Records the network sender had to drop (buffer full); 0 for the file transport."""
        return self._sender.dropped if self._sender is not None else 0

    # -- internals ------------------------------------------------------------------------

    def _enter(self, name: str) -> float:
        self._depth += 1
        if self._depth == 1:
            self._write({"ev": "enter", "step": self._step, "name": name})
        return time.perf_counter()

    def _leave(self, name: str, t0: float) -> None:
        self._depth -= 1
        if self._depth == 0:
            dur_s = time.perf_counter() - t0
            with self._lock:
                self._comm_s += dur_s
            self._write({"ev": "leave", "step": self._step, "name": name, "dur_s": dur_s})

    def _async_enter(self, name: str) -> tuple[int, int, float] | None:
        """An asynchronous collective was issued (async_op=True): `enter` with an id; the
        matching `leave` comes from its completion callback (`_async_leave`). None inside a
        wrapped block (the outer block is what is recorded)."""
        if self._depth:
            return None
        with self._lock:
            cid = self._next_id
            self._next_id += 1
        self._write({"ev": "enter", "step": self._step, "name": name, "id": cid})
        return cid, self._step, time.perf_counter()

    def _async_leave(self, name: str, token: tuple[int, int, float]) -> None:
        cid, step, t0 = token
        dur_s = time.perf_counter() - t0
        with self._lock:
            if step == self._step:
                self._comm_s += dur_s  # in-flight time; overlapping ops are capped at step_s
        self._write({"ev": "leave", "step": step, "name": name, "dur_s": dur_s, "id": cid})

    def _write(self, rec: dict) -> None:
        rec["t"] = time.time()
        with self._lock:
            sender = self._sender
            if sender is not None:
                sender.send(rec)
                return
            f = self._file
            if f is None:
                return
            try:
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            except (OSError, ValueError, RuntimeError):  # disk full, closed, or re-entered from
                # the SIGTERM handler in the middle of a write: never break training
                pass

    def _beat(self) -> None:
        try:
            self._hb.touch()
        except OSError:
            pass

    def _heartbeat_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._beat()

    def _install_sigterm(self) -> None:
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: object) -> None:
            # Mark that this rank was stopped from outside (a victim of a teardown, not the
            # culprit), then let the original disposition act.
            self._write({"ev": "signal", "sig": signum, "step": self._step})
            if self._sender is not None:  # the process dies next: get the record out first
                self._sender.flush(timeout_s=1.0)
            self._stop.set()
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            if callable(previous):
                previous(signum, frame)
            else:
                os.kill(os.getpid(), signum)

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            pass
