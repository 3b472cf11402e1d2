"""Progress on stderr for work that takes longer than a second (large clusters, advice).

    with progress("planning llama3.1-405b on 100,000 GPUs"):
        result = search_nodes(...)

Silent when stderr is not a terminal, so logs and `2>` captures stay one error line at most;
on a terminal it says what is running after `after_s` seconds and how long it took.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator

AFTER_S = 1.0
"""Work shorter than this prints nothing."""


@contextlib.contextmanager
def progress(what: str, after_s: float = AFTER_S, stream=None) -> Iterator[None]:
    stream = stream or sys.stderr
    if not stream.isatty():
        yield
        return
    start = time.perf_counter()
    said = threading.Event()

    def announce() -> None:
        said.set()
        stream.write(f"{what} ...\n")
        stream.flush()

    timer = threading.Timer(after_s, announce)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if said.is_set():
            stream.write(f"{what}: done in {time.perf_counter() - start:.1f} s\n")
            stream.flush()
