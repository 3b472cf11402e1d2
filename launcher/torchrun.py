"""Per-node `torchrun` commands that realise a plan's placement, and the shell scripts around them.

Placement. A plan says which physical node runs node rank i (`plan.node_order[i]`), and global
rank r runs on node rank r // gpus_per_node. torchrun's `c10d` rendezvous does not honour
`--node-rank`: it numbers the agents by sorting their descriptors (host address, pid; see
torch/distributed/elastic/rendezvous/dynamic_rendezvous.py, `_mark_rendezvous_complete`), so
the node that happens to sort first becomes group rank 0. We keep c10d (it re-forms the group
on restarts) and pin the ranks ourselves: every node exports MESHPLAN_NODE_RANK, and the
worker entry is a tiny fixed bash prologue (`RANK_PIN`) that, when the whole planned group is
present, sets RANK = MESHPLAN_NODE_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK (and GROUP_RANK)
before exec'ing the training script. This is a permutation of torchrun's ranks, so it is safe:
under torchrun every rank is a client of the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE;
torch/distributed/rendezvous.py `_create_c10d_store`), and init_process_group(env://) reads
RANK from the environment.

Everything user-controlled that reaches a shell is quoted with shlex.quote; the worker argv is
passed by torchrun to the OS without a shell.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cost_models.specs import SpecError
from planner.planfile import Plan

from .collector import split_host_port

DEFAULT_RDZV_PORT = 29500
DEFAULT_PYTHON = "python3"
# Fixed prologue run by bash as the torchrun worker (no user text inside; arguments via "$@").
RANK_PIN = (
    'if [ -n "${MESHPLAN_NODE_RANK:-}" ] && [ "${GROUP_WORLD_SIZE:-}" = "${MESHPLAN_NNODES:-}" ]; '
    'then export GROUP_RANK="$MESHPLAN_NODE_RANK" '
    'RANK="$((MESHPLAN_NODE_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK))"; export ROLE_RANK="$RANK"; fi; '
    'exec "$@"'
)
RANK_PIN_NAME = "meshplan-rank-pin"


@dataclass(frozen=True, slots=True)
class NodeCommand:
    """What to run on one node: `env` (added to the inherited environment) + `argv`."""

    node_name: str
    """Plan node name (cluster.yaml / preset name) of this node."""
    node_rank: int
    """Node rank the plan gives this node; global ranks node_rank*G .. node_rank*G+G-1."""
    argv: tuple[str, ...]
    """Full torchrun argv, starting with "torchrun"."""
    env: dict[str, str]
    """Extra environment: rank pinning, NCCL watchdog and flight recorder settings."""
    host: str = ""
    """Host name the command must run on (from the hosts file; the node name by default)."""

    def shell_line(self) -> str:
        """One POSIX-shell line: `env K=V ... torchrun ...`, every word quoted."""
        words = ["env", *(f"{k}={v}" for k, v in sorted(self.env.items())), *self.argv]
        return " ".join(shlex.quote(w) for w in words)


def watchdog_env(dump_dir: str) -> dict[str, str]:
    """PyTorch NCCL watchdog + flight recorder settings: a hang becomes a dump and an exit.

    Names from torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp and FlightRecorder.hpp
    (torch 2.13): ASYNC_ERROR_HANDLING=3 (SkipCleanUp) kills the process on a collective
    error/timeout without ncclCommAbort, which can itself hang; the monitoring thread aborts
    a stuck watchdog after HEARTBEAT_TIMEOUT_SEC; DUMP_ON_TIMEOUT writes the flight recorder
    ring buffer (TORCH_FR_BUFFER_SIZE entries) to <dump_dir>/nccl_trace_rank_<rank>. Only the
    flight recorder's TORCH_FR_* names are set: torch 2.13 warns that TORCH_NCCL_TRACE_BUFFER_SIZE
    is deprecated (its old name for the buffer size) and reads the FR names first.
    """
    prefix = str(Path(dump_dir) / "nccl_trace_rank_")
    return {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "300",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_BUFFER_SIZE": "20000",
        "TORCH_FR_DUMP_TEMP_FILE": prefix,
        "MESHPLAN_DUMP_DIR": str(dump_dir),
    }


def default_run_id(plan: Plan) -> str:
    """A stable rendezvous id: 'meshplan-' + 10 hex digits of the plan's content."""
    digest = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True, default=str).encode())
    return f"meshplan-{digest.hexdigest()[:10]}"


def resolve_hosts(plan: Plan, hosts: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """Plan node name -> host name. A sequence lists hosts in cluster node order."""
    names = [n.name for n in plan.cluster.nodes]
    if hosts is None:
        return {n: n for n in names}
    if isinstance(hosts, Mapping):
        unknown = sorted(set(hosts) - set(names))
        missing = [n for n in names if n not in hosts]
        if unknown or missing:
            raise SpecError(
                f"hosts file must name each plan node once; unknown {unknown}, missing {missing} "
                f"(plan nodes: {names})"
            )
        mapping = {n: str(hosts[n]) for n in names}
    else:
        if len(hosts) != len(names):
            raise SpecError(
                f"hosts file lists {len(hosts)} hosts but the plan has {len(names)} nodes "
                f"({names}); give one host per node"
            )
        mapping = dict(zip(names, (str(h) for h in hosts), strict=True))
    for name, host in mapping.items():
        check_host(host, f"{name} {host}")
    return mapping


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def check_host(host: str, where: str, source: str = "hosts file") -> str:
    """`host` if it is an RFC 1123 host name or an IPv4/IPv6 address; SpecError quoting
    `where` (the hosts-file line) otherwise."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(p) for p in name.split(".")):
        return host
    raise SpecError(f"{source}: {_quote_line(where)} is not a valid host name (RFC 1123: "
                    "letters, digits, '-' and dots) or IP address; fix it")


def _quote_line(line: str, limit: int = 80) -> str:
    return repr(line if len(line) <= limit else line[: limit - 3] + "...")


def parse_hosts_file(text: str, plan: Plan) -> dict[str, str] | list[str]:
    """Hosts file: one node per line, '#' comments. Either 'NODE_NAME HOST' (NODE_NAME a plan
    node) on every line, or just 'HOST' per line in the cluster's node order. Every HOST must
    be an RFC 1123 host name or an IP address; any other line is refused, quoted."""
    names = [n.name for n in plan.cluster.nodes]
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    fields = [ln.split() for ln in lines]
    for ln, parts in zip(lines, fields, strict=True):
        if len(parts) > 2:
            raise SpecError(f"hosts file: line {_quote_line(ln)} has {len(parts)} fields; write "
                            "'NODE HOST' or 'HOST' per line")
        if len(parts) == 2 and parts[0] not in names:
            raise SpecError(f"hosts file: line {_quote_line(ln)} names {parts[0]!r}, which is not "
                            f"a plan node (plan nodes: {', '.join(names[:6])}"
                            f"{', ...' if len(names) > 6 else ''})")
    named = [len(p) == 2 for p in fields]
    if any(named) and not all(named):
        raise SpecError("hosts file mixes 'NODE HOST' lines with bare HOST lines; use one form")
    for ln, parts in zip(lines, fields, strict=True):
        check_host(parts[-1], ln)
    if lines and all(named):
        out: dict[str, str] = {}
        for name, host in fields:
            if name in out:
                raise SpecError(f"hosts file names node {name} twice")
            out[name] = host
        return out
    return [p[0] for p in fields]


def _endpoint(plan: Plan, host_of: dict[str, str], rdzv_endpoint: str | None) -> str:
    if rdzv_endpoint is None:
        return f"{host_of[plan.node_order[0]]}:{DEFAULT_RDZV_PORT}"
    hp = split_host_port(rdzv_endpoint)
    if hp is None:
        raise SpecError(f"rendezvous endpoint {rdzv_endpoint[:80]!r} must be HOST:PORT, e.g. "
                        "node0:29500")
    check_host(hp[0].strip("[]"), rdzv_endpoint, "--rdzv-endpoint")  # [v6]:port or name:port
    return rdzv_endpoint


def torchrun_argv(plan: Plan, script: str, script_args: Sequence[str], *, node_rank: str,
                  endpoint: str, run_id: str, max_restarts: int, is_host: str | None,
                  python: str = DEFAULT_PYTHON) -> tuple[str, ...]:
    """The torchrun argv of one node. node_rank/endpoint/is_host are words (placeholders that a
    script fills in are allowed); is_host None lets torch decide by matching the host name."""
    n = plan.nnodes
    host_conf = () if is_host is None else (f"--rdzv-conf=is_host={is_host}",)
    return (
        "torchrun",
        f"--nnodes={n}:{n}",  # the layout's world size is fixed; shrinking goes through re-plan
        f"--nproc-per-node={plan.gpus_per_node}",
        f"--node-rank={node_rank}",  # honoured by static rendezvous; c10d uses RANK_PIN
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        *host_conf,
        f"--max-restarts={max_restarts}",
        "--no-python",
        "bash", "-c", RANK_PIN, RANK_PIN_NAME,
        python, "-u", str(script), *map(str, script_args),
    )


def torchrun_commands(plan: Plan, script: str, script_args: Sequence[str] = (),
                      hosts: Mapping[str, str] | Sequence[str] | None = None,
                      rdzv_endpoint: str | None = None, run_id: str | None = None,
                      max_restarts: int = 0, *, dump_dir: str | None = None,
                      python: str = DEFAULT_PYTHON,
                      extra_env: Mapping[str, str] | None = None) -> list[NodeCommand]:
    """One NodeCommand per node rank, in node-rank order (plan.node_order).

    hosts: plan node name -> host (or hosts in cluster node order); default: the node names.
    rdzv_endpoint: HOST:PORT of the c10d store; default host of node rank 0, port 29500.
    dump_dir: where flight-recorder dumps go (default /tmp/<run_id>-dumps); callers that
    run the argv directly must create it.
    """
    if max_restarts < 0:
        raise SpecError(f"--max-restarts must be >= 0, got {max_restarts}")
    host_of = resolve_hosts(plan, hosts)
    endpoint = _endpoint(plan, host_of, rdzv_endpoint)
    run_id = run_id or default_run_id(plan)
    base_env = dict(watchdog_env(dump_dir or f"/tmp/{run_id}-dumps"), **(extra_env or {}))
    out = []
    for rank, name in enumerate(plan.node_order):
        # MESHPLAN_NODE: the node name launcher.runtime's StepMonitor records for each rank.
        env = dict(base_env, MESHPLAN_NODE_RANK=str(rank), MESHPLAN_NNODES=str(plan.nnodes),
                   MESHPLAN_NODE_NAME=name, MESHPLAN_NODE=name)
        argv = torchrun_argv(plan, script, script_args, node_rank=str(rank), endpoint=endpoint,
                             run_id=run_id, max_restarts=max_restarts,
                             is_host="true" if rank == 0 else "false", python=python)
        out.append(NodeCommand(name, rank, argv, env, host_of[name]))
    return out


def node_script(cmd: NodeCommand, nnodes: int) -> str:
    """A bash script running `cmd` on its node; extra arguments go to the training script."""
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        f"# meshplan launch: node rank {cmd.node_rank} of {nnodes}.",
        f"# Run on host {q(cmd.host)} (plan node {q(cmd.node_name)}); start every node's script.",
        "# Arguments given to this script are appended to the training script's arguments.",
        "set -euo pipefail",
    ]
    lines += [f"export {k}={q(v)}" for k, v in sorted(cmd.env.items())]
    lines.append('mkdir -p -- "$MESHPLAN_DUMP_DIR"')
    lines.append("exec " + " ".join(q(w) for w in cmd.argv) + ' "$@"')
    return "\n".join(lines) + "\n"
