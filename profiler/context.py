"""Who am I in the torchrun job: ranks, nodes, backend and device, shared by every measurement.

The same measurement code runs on NCCL/CUDA and on gloo/CPU; only `ProfileContext.backend`
and `.device` differ. Outside torchrun (no RANK in the environment) the profiler runs as a
one-process world, which measures the local device and writes a one-node cluster.yaml.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cost_models.specs import SpecError

BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True, slots=True)
class ProfileContext:
    """This process's place in the job (all fields identical in meaning on every rank)."""

    backend: str
    """nccl | gloo."""
    device: str
    """torch device string of this rank: cuda:<local_rank> or cpu."""
    rank: int
    world_size: int
    local_rank: int
    node_index: int
    """Position of this rank's node in `node_names` (torchrun's GROUP_RANK)."""
    node_names: tuple[str, ...]
    """One name per node, node order = cluster.yaml order (hostname or MESHPLAN_NODE_NAME)."""
    node_ranks: tuple[tuple[int, ...], ...]
    """Global ranks on each node, local-rank order; node_ranks[i][0] is node i's leader."""
    quick: bool

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    @property
    def leaders(self) -> tuple[int, ...]:
        """Global rank of local rank 0 on each node (the rank that measures node-pair links)."""
        return tuple(ranks[0] for ranks in self.node_ranks)

    @property
    def is_leader(self) -> bool:
        return self.local_rank == 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        """Wait for queued device work, so that host timers see finished transfers."""
        if self.on_cuda:
            torch.cuda.synchronize(self.device)


def node_name() -> str:
    """MESHPLAN_NODE_NAME if set (tests, containers with meaningless hostnames), else hostname."""
    return os.environ.get("MESHPLAN_NODE_NAME") or socket.gethostname()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def choose_backend(requested: str) -> str:
    """auto -> nccl when CUDA is available, else gloo; nccl without CUDA is a user error."""
    if requested not in BACKENDS:
        raise SpecError(f"--backend {requested!r} is not one of {BACKENDS}")
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise SpecError("--backend nccl needs CUDA GPUs, none visible; use --backend gloo")
    return requested


def init_context(requested_backend: str, quick: bool, timeout_s: float = 600.0) -> ProfileContext:
    """Join the torchrun job (or a one-process world) and learn the node layout."""
    backend = choose_backend(requested_backend)
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        kwargs = {"device_id": torch.device(device)} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
    else:  # not under torchrun: a world of one, no rendezvous needed
        rank, world, local_rank = 0, 1, 0
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    me = (_env_int("GROUP_RANK", 0), local_rank, node_name())
    everyone: list = [None] * world
    dist.all_gather_object(everyone, me)
    return layout_from_ranks(backend, device, rank, local_rank, everyone, quick)


def layout_from_ranks(backend: str, device: str, rank: int, local_rank: int, everyone: list,
            quick: bool) -> ProfileContext:
    """Group ranks into nodes by torchrun's GROUP_RANK; check each node has one name."""
    groups: dict[int, list[tuple[int, int, str]]] = {}
    for global_rank, (group, local, name) in enumerate(everyone):
        groups.setdefault(group, []).append((local, global_rank, name))
    node_names, node_ranks = [], []
    for group in sorted(groups):
        members = sorted(groups[group])
        names = {name for _, _, name in members}
        if len(names) != 1:
            raise SpecError(f"node {group} reports several names {sorted(names)}; "
                            "set MESHPLAN_NODE_NAME consistently on each node")
        node_names.append(names.pop())
        node_ranks.append(tuple(r for _, r, _ in members))
    if len(set(node_names)) != len(node_names):
        raise SpecError(f"two torchrun nodes share a host name ({node_names}); set "
                        "MESHPLAN_NODE_NAME=<unique name> on each node")
    my_node = next(i for i, ranks in enumerate(node_ranks) if rank in ranks)
    return ProfileContext(backend, device, rank, len(everyone), local_rank, my_node,
                          tuple(node_names), tuple(node_ranks), quick)


def agree_or_raise(error: str | None) -> None:
    """Collective error check: if any rank hit a user error, every rank raises it.

    Without this one rank would exit while the others hang in the next collective.
    """
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise SpecError(first)


def gather(obj: object) -> list:
    """all_gather_object returning the list (rank order)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


Progress = Callable[[str], None]


def make_progress(ctx: ProfileContext, stream) -> Progress:
    """A printer for rank 0 that stamps seconds since start; silent on other ranks."""
    start = time.perf_counter()

    def progress(message: str) -> None:
        if ctx.is_root:
            print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=stream, flush=True)

    return progress
