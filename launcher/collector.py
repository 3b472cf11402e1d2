"""Rank records over the network: a TCP collector the supervisor serves, and the ranks' sender.

The supervisor and the ranks need not share a file system: each rank (`launcher.runtime`,
when MESHPLAN_COLLECTOR=HOST:PORT/ATTEMPT is set) streams its records as JSON lines over one
TCP connection, and the collector writes them into the supervisor's local
`ATTEMPT/monitor/rank<R>.jsonl` files and refreshes `rank<R>.hb` on each heartbeat line, so the
detectors read exactly what they read when the ranks wrote the files themselves.

Wire format (one JSON object per line, UTF-8):
    {"hello": 1, "attempt": "attempt0", "rank": R}      first line of a rank's connection
    {"hello": 1, "attempt": "attempt0", "agent": NODE}  first line of a node agent's connection
    {"hb": 1}                                           heartbeat (not a record)
    {..record.., "seq": N}                              a record, N = 0, 1, 2, ... per rank

Delivery: the sender keeps at most `buffer_records` unsent records (oldest dropped first when
the supervisor is unreachable for long), reconnects with a capped exponential back-off, and
re-sends what it cannot know arrived; the collector drops duplicates (seq <= last seen) and
counts every gap in the sequence as lost records, so a loss is counted, never hidden
(`Collector.stats()`, written to `ATTEMPT/monitor/collector.json` and `run.json`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("meshplan.collector")

COLLECTOR_ENV = "MESHPLAN_COLLECTOR"
_ATTEMPT = re.compile(r"^attempt\d+$")
MAX_LINE_BYTES = 1 << 20
"""A longer line is a protocol error: the connection is closed."""


def split_host_port(text: str) -> tuple[str, int] | None:
    """'HOST:PORT' (or '[v6]:PORT') -> (host as written, port); None unless a host is given
    and the port is 1..65535."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where ranks send records: host, port and the attempt directory name."""

    host: str
    port: int
    attempt: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.attempt}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """HOST:PORT/ATTEMPT; ValueError with the expected form otherwise."""
        addr, _, attempt = text.rpartition("/")
        hp = split_host_port(addr)
        if hp is None or not _ATTEMPT.match(attempt):
            raise ValueError(f"{COLLECTOR_ENV}={text!r} must look like HOST:PORT/attempt<K>")
        return cls(hp[0].strip("[]"), hp[1], attempt)


# -- the supervisor's side -------------------------------------------------------------------

@dataclass(slots=True)
class _Stream:
    """Per (attempt, rank) bookkeeping; mutated only under the collector's lock."""

    received: int = 0
    lost: int = 0
    duplicates: int = 0
    connections: int = 0
    last_seq: int = -1


class Collector:
    """Threaded TCP server writing ranks' records into `root/<attempt>/monitor/`.

    `root` is the run directory; one collector serves every attempt of a run (each connection
    names its attempt in its hello line). Agents' exit reports go to `agents.jsonl` there.
    """

    def __init__(self, root: Path, bind_host: str = "127.0.0.1", port: int = 0) -> None:
        self.root = Path(root)
        self._sock = socket.create_server((bind_host, port), reuse_port=False)
        self._sock.settimeout(0.5)
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, int], _Stream] = {}
        self._files: dict[tuple[str, int], object] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="meshplan-collector",
                                        daemon=True)
        self._accept.start()

    def endpoint(self, host: str, attempt: str) -> Endpoint:
        """The address ranks of `attempt` must use (`host`: how they reach this machine)."""
        return Endpoint(host, self.port, attempt)

    def stats(self, attempt: str | None = None) -> dict:
        """{"received", "lost", "duplicates", "connections", "ranks": {rank: {...}}}."""
        with self._lock:
            items = [(k, dataclass_dict(s)) for k, s in self._streams.items()
                     if attempt is None or k[0] == attempt]
        total = {key: sum(s[key] for _, s in items)
                 for key in ("received", "lost", "duplicates", "connections")}
        total["ranks"] = {f"{a}/{r}" if attempt is None else str(r): s for (a, r), s in sorted(items)}
        return total

    def close(self) -> None:
        """Stop accepting, let connection threads finish their reads, close the files."""
        self._stop.set()
        self._accept.join(timeout=2.0)
        for t in list(self._threads):
            t.join(timeout=2.0)
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            for fh in self._files.values():
                with contextlib.suppress(OSError):
                    fh.close()
            self._files.clear()

    # -- internals ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                 name="meshplan-collector-conn")
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.5)
        buf, key = b"", None
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    key = self._line(key, line)
                    if key is False:
                        return
                if len(buf) > MAX_LINE_BYTES:
                    log.warning("collector: line over %d bytes; closing connection", MAX_LINE_BYTES)
                    return

    def _line(self, key, line: bytes):
        """Handle one line; returns the connection's key (False: close the connection)."""
        if not line.strip():
            return key
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("collector: skipping corrupt line %r", line[:80])
            return key
        if not isinstance(rec, dict):
            return key
        if key is None:
            return self._hello(rec)
        kind, who = key
        if kind == "agent" and "hb" not in rec:
            self._append(self.root / who[0] / "monitor" / "agents.jsonl", rec)
            return key
        if kind == "agent":
            return key
        if "hb" in rec:
            with contextlib.suppress(OSError):
                os.utime(self._monitor_dir(who[0]) / f"rank{who[1]}.hb")
            return key
        self._record(who, rec)
        return key

    def _hello(self, rec: dict):
        attempt = rec.get("attempt")
        if rec.get("hello") != 1 or not isinstance(attempt, str) or not _ATTEMPT.match(attempt):
            log.warning("collector: connection without a valid hello; closed")
            return False
        if isinstance(rec.get("agent"), str):
            return ("agent", (attempt, rec["agent"]))
        rank = rec.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < 1 << 24:
            log.warning("collector: hello without a valid rank; closed")
            return False
        mdir = self._monitor_dir(attempt)
        mdir.mkdir(parents=True, exist_ok=True)
        (mdir / f"rank{rank}.hb").touch()
        with self._lock:
            self._streams.setdefault((attempt, rank), _Stream()).connections += 1
        return ("rank", (attempt, rank))

    def _monitor_dir(self, attempt: str) -> Path:
        return self.root / attempt / "monitor"

    def _record(self, who: tuple[str, int], rec: dict) -> None:
        seq = rec.get("seq")
        with self._lock:
            st = self._streams[who]
            if isinstance(seq, int):
                if seq <= st.last_seq:
                    st.duplicates += 1
                    return
                st.lost += seq - st.last_seq - 1
                st.last_seq = seq
            st.received += 1
            fh = self._files.get(who)
            if fh is None:
                fh = self._files[who] = open(self._monitor_dir(who[0]) / f"rank{who[1]}.jsonl",
                                             "a", buffering=1, encoding="utf-8")
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def _append(self, path: Path, rec: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")


def dataclass_dict(st: _Stream) -> dict:
    return {"received": st.received, "lost": st.lost, "duplicates": st.duplicates,
            "connections": st.connections}


# -- the ranks' side -------------------------------------------------------------------------

class Sender:
    """Bounded, reconnecting, loss-counting record stream to a `Collector` (daemon thread).

    `send(rec)` never blocks and never raises: the record gets the next sequence number and
    joins a deque of at most `buffer_records`; when it is full the oldest record is dropped
    (counted in `dropped`, and seen by the collector as a gap). The thread sends the buffer,
    a heartbeat line every `heartbeat_s`, and reconnects after any error (back-off 0.1 s
    doubling to 2 s), re-sending records whose delivery it could not confirm.
    """

    def __init__(self, endpoint: Endpoint, hello: dict, heartbeat_s: float = 1.0,
                 buffer_records: int = 10_000, connect_timeout_s: float = 2.0) -> None:
        self.endpoint = endpoint
        self._hello = json.dumps({"hello": 1, "attempt": endpoint.attempt, **hello}).encode() + b"\n"
        self._hb_s = heartbeat_s
        self._timeout_s = connect_timeout_s
        self._buf: collections.deque[tuple[int, bytes]] = collections.deque()
        self._max = buffer_records
        self._cond = threading.Condition()
        self._seq = 0
        self.dropped = 0
        self.reconnects = 0
        self._sent_seq = -1
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="meshplan-sender", daemon=True)
        self._thread.start()

    def send(self, rec: dict) -> None:
        with self._cond:
            rec["seq"] = self._seq
            self._seq += 1
            if len(self._buf) >= self._max:
                self._buf.popleft()
                self.dropped += 1
            self._buf.append((rec["seq"], json.dumps(rec, separators=(",", ":")).encode() + b"\n"))
            self._cond.notify()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every record so far was handed to the kernel; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._buf and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout_s: float = 2.0) -> None:
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=0.5)

    def _loop(self) -> None:
        backoff = 0.1
        while True:
            with self._cond:
                if self._closed:
                    return
            try:
                sock = socket.create_connection((self.endpoint.host, self.endpoint.port),
                                                timeout=self._timeout_s)
            except OSError:
                time.sleep(backoff)
                backoff = min(2 * backoff, 2.0)
                self.reconnects += 1
                continue
            backoff = 0.1
            try:
                with sock:
                    sock.sendall(self._hello)
                    self._pump(sock)
            except OSError:
                self.reconnects += 1
            with self._cond:
                if self._closed:
                    return

    def _pump(self, sock: socket.socket) -> None:
        """Send until closed or an error; records are removed only after sendall returned."""
        next_hb = 0.0
        resend_from = -1  # on a new connection, everything still buffered is sent again
        while True:
            with self._cond:
                if not self._buf and not self._closed:
                    self._cond.wait(max(min(next_hb - time.monotonic(), self._hb_s), 0.01))
                batch = [item for item in list(self._buf)[:512] if item[0] > resend_from]
                closed = self._closed and not self._buf
            now = time.monotonic()
            if now >= next_hb:
                sock.sendall(b'{"hb":1}\n')
                next_hb = now + self._hb_s
            if batch:
                sock.sendall(b"".join(line for _, line in batch))
                resend_from = batch[-1][0]
                with self._cond:
                    while self._buf and self._buf[0][0] <= resend_from:
                        self._buf.popleft()
                    self._cond.notify_all()
            if closed:
                return
