"""See every collective without the script's help: wrap torch.distributed's entry points.

What torch 2.13 (the CPU build this project tests with) offers, checked on gloo:

* `ProcessGroup._register_on_completion_hook` — per-work completion hook with timings — raises
  "Only ProcessGroupNCCL supports onCompletion hook, but got gloo backend".
* The flight recorder (`torch._C._distributed_c10d._dump_fr_trace_json`) does record gloo
  collectives (TORCH_FR_BUFFER_SIZE > 0; entries with profiling_name, collective_seq_id,
  time_created_ns / time_discovered_started_ns / time_discovered_completed_ns), but only as a
  ring buffer dumped on demand, not as a stream; meshplan leaves it on for NCCL post-mortems.

So the runtime hook intercepts the collective entry points of `torch.distributed` when it is
installed (`StepMonitor.hook_collectives`, called by `StepMonitor.from_env`): each function
in `COLLECTIVES` is replaced, in both `torch.distributed` and
`torch.distributed.distributed_c10d`, by a wrapper that writes the same `enter`/`leave`
records `mon.comm` writes. Synchronous calls are timed around the call; for `async_op=True`
(FSDP2's all_gather_single/reduce_scatter_single, pipelining's batch_isend_irecv) `enter` is
written at issue and `leave` from the work's future when it completes. Library code that looks
the functions up at call time (`dist.all_gather_single(...)`, as FSDP2, DTensor's eager
redistribute fallback and torch.distributed.pipelining do) is seen. NOT seen: functional
collectives (`torch.distributed._functional_collectives`, the `_c10d_functional` ops DTensor
and compiled code use), which bypass these Python functions, and references bound before the
hook was installed (`from torch.distributed import all_reduce` at import time); wrap those in
`mon.comm`. A call inside a `mon.comm` block is recorded once, under the block's name.
"""

from __future__ import annotations

import functools
import sys
import threading

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce",
    "barrier", "all_to_all", "all_to_all_single", "batch_isend_irecv", "gather", "scatter",
    "monitored_barrier",
)
"""torch.distributed functions wrapped (those a torch version lacks are skipped)."""

_lock = threading.Lock()
_installed: dict[str, object] = {}
"""name -> original function while a monitor is hooked."""
_owner: list[object] = []


def install(mon) -> bool:
    """Wrap the collectives for `mon` (one monitor per process); False without torch."""
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return False
    c10d = sys.modules.get("torch.distributed.distributed_c10d")
    with _lock:
        if _installed:
            uninstall_locked()
        _owner[:] = [mon]
        for name in COLLECTIVES:
            orig = getattr(dist, name, None)
            if orig is None:
                continue
            _installed[name] = orig
            wrapped = _wrap(mon, name, orig)
            setattr(dist, name, wrapped)
            if c10d is not None and getattr(c10d, name, None) is orig:
                setattr(c10d, name, wrapped)
    return True


def uninstall(mon) -> None:
    """Restore the originals if `mon` installed the wrappers."""
    with _lock:
        if _owner and _owner[0] is mon:
            uninstall_locked()


def uninstall_locked() -> None:
    dist = sys.modules.get("torch.distributed")
    c10d = sys.modules.get("torch.distributed.distributed_c10d")
    for name, orig in _installed.items():
        for mod in (dist, c10d):
            if mod is not None and getattr(getattr(mod, name, None), "__wrapped__", None) is orig:
                setattr(mod, name, orig)
    _installed.clear()
    _owner.clear()


def _wrap(mon, name: str, orig):
    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        if not kwargs.get("async_op", False) and name != "batch_isend_irecv":
            t0 = mon._enter(name)
            try:
                return orig(*args, **kwargs)
            finally:
                mon._leave(name, t0)
        token = mon._async_enter(name)
        work = orig(*args, **kwargs)
        if token is not None:
            _on_done(mon, name, token, work)
        return work

    return wrapper


def _on_done(mon, name: str, token, work) -> None:
    """Write `leave` when `work` (a Work, a list of them, or None) completes."""
    works = [w for w in (work if isinstance(work, list) else [work]) if w is not None]
    if not works:
        mon._async_leave(name, token)
        return
    left = [len(works)]
    guard = threading.Lock()

    def done(_fut) -> None:
        with guard:
            left[0] -= 1
            last = left[0] == 0
        if last:
            mon._async_leave(name, token)

    for w in works:
        try:
            w.get_future().then(done)
        except (RuntimeError, AttributeError):  # a backend without futures: time the issue only
            done(None)
