"""The SLURM batch script for a plan: `sbatch launch.sbatch` starts one torchrun per node.

The head node (rendezvous host) comes from `scontrol show hostnames "$SLURM_JOB_NODELIST"`
(or the hosts file). Node ranks: with a hosts file, a node's rank is the position of
$SLURMD_NODENAME in the plan's host list (so the plan's placement holds whatever order SLURM
allocates in); without one, SLURM's node order ($SLURM_NODEID) is the plan's node order.

NVLink domains larger than a node (GB200/GB300 NVL72: 18 trays per rack, one NVLink fabric):
the rack is the allocation block. `#SBATCH --segment=S` (Slurm >= 24.05, with the
topology/block plugin whose base blocks are the racks; sbatch(1): "When a block or ring
topology is used, this defines the size of the segments that will be used to create the job
allocation", and a node count above S must be a multiple of S) asks for whole segments inside
one block each. The multi-node NVLink fabric needs an IMEX channel per job: Slurm allocates
one when the cluster runs SwitchType=switch/nvidia_imex (slurm.conf(5), Slurm >= 24.05);
NCCL_MNNVL_ENABLE=1 makes NCCL fail at start-up instead of silently falling back to the NICs
when the fabric is absent (NCCL src/init.cc: "MNNVL is not supported on this system"), and each
node checks for its channel device (/dev/nvidia-caps-imex-channels/channel*) before torchrun.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from planner.planfile import Plan
from planner.specfiles import job_domain_nodes

from .torchrun import DEFAULT_PYTHON, DEFAULT_RDZV_PORT, torchrun_argv, watchdog_env

_SAFE_SLURM_WORD = re.compile(r"^[A-Za-z0-9._-]+$")
_PLACEHOLDERS = {"@NODE_RANK@": '"$NODE_RANK"', "@ENDPOINT@": '"$MESHPLAN_RDZV_ENDPOINT"',
                 "@IS_HOST@": '"$IS_HOST"'}


def quote_with_placeholders(argv: Sequence[str]) -> str:
    """Shell-quote argv, then turn @NAME@ placeholders into double-quoted variable expansions
    (only allowed in words that need no quoting otherwise)."""
    words = []
    for word in argv:
        quoted = shlex.quote(word)
        if "@" in word and any(p in word for p in _PLACEHOLDERS):
            assert quoted == word, f"placeholder in a word that needs quoting: {word!r}"
            for key, expansion in _PLACEHOLDERS.items():
                quoted = quoted.replace(key, expansion)
        words.append(quoted)
    return " ".join(words)


def _bash_array(name: str, items: Sequence[str]) -> str:
    return f"{name}=(" + " ".join(shlex.quote(i) for i in items) + ")"


IMEX_CHANNELS = "/dev/nvidia-caps-imex-channels"
"""Where the NVIDIA driver exposes IMEX channels (Slurm's switch/nvidia_imex creates one per
job: src/plugins/switch/nvidia_imex/imex_device.c)."""


def nvlink_segment(plan: Plan) -> int:
    """Nodes per SLURM segment for a plan whose NVLink domain spans several nodes: the plan's
    nodes per domain, or (when the node count is not a multiple of it) its largest divisor of
    the node count below that (sbatch requires --nodes to be a multiple of --segment); 0 when
    the domain is one node (no segment needed)."""
    per_domain = plan.cluster.nodes_per_domain
    if per_domain <= 1 or plan.cluster.gpu.name == "CPU":
        return 0
    return job_domain_nodes(per_domain, plan.nnodes)


def imex_check() -> list[str]:
    """Bash lines: stop with one clear line when the node has no IMEX channel (unless the
    user turned multi-node NVLink off with NCCL_MNNVL_ENABLE=0)."""
    return [
        'if [ "${NCCL_MNNVL_ENABLE:-1}" != 0 ] && ! compgen -G '
        f'"{IMEX_CHANNELS}/channel*" > /dev/null; then',
        '  echo "meshplan: no IMEX channel on $SLURMD_NODENAME '
        f'({IMEX_CHANNELS}/ is empty): the plan runs groups over the multi-node NVLink fabric; '
        'ask for SwitchType=switch/nvidia_imex (Slurm >= 24.05), or export NCCL_MNNVL_ENABLE=0 '
        'to run them over the NICs" >&2; exit 1',
        "fi",
    ]


def node_snippet(plan: Plan, argv: Sequence[str], plan_hosts: Sequence[str]) -> str:
    """Bash run by srun on every node: find this node's plan rank, pin it, exec torchrun."""
    return "\n".join([
        "set -euo pipefail",
        _bash_array("PLAN_HOSTS", plan_hosts),
        _bash_array("NODE_NAMES", plan.node_order),
        'NODE_RANK="$SLURM_NODEID"',
        'if ((${#PLAN_HOSTS[@]})); then',
        '  NODE_RANK=""',
        '  for i in "${!PLAN_HOSTS[@]}"; do',
        '    if [ "${PLAN_HOSTS[$i]}" = "$SLURMD_NODENAME" ]; then NODE_RANK="$i"; fi',
        "  done",
        '  if [ -z "$NODE_RANK" ]; then',
        '    echo "meshplan: SLURM node $SLURMD_NODENAME is not in the plan\'s hosts" >&2; exit 1',
        "  fi",
        "fi",
        'IS_HOST=false; if [ "$NODE_RANK" = 0 ]; then IS_HOST=true; fi',
        'export MESHPLAN_NODE_RANK="$NODE_RANK" MESHPLAN_NODE_NAME="${NODE_NAMES[$NODE_RANK]}"',
        'export MESHPLAN_NODE="$MESHPLAN_NODE_NAME"',
        *(imex_check() if nvlink_segment(plan) else []),
        "exec " + quote_with_placeholders(argv),
    ]) + "\n"


def sbatch_script(plan: Plan, script: str, script_args: Sequence[str], *, run_id: str,
                  max_restarts: int, dump_dir: str, plan_hosts: Sequence[str] = (),
                  port: int = DEFAULT_RDZV_PORT, python: str = DEFAULT_PYTHON,
                  extra_env: dict[str, str] | None = None) -> str:
    """The sbatch script. plan_hosts: SLURM node names in node-rank order (may be empty)."""
    q = shlex.quote
    argv = torchrun_argv(plan, script, script_args, node_rank="@NODE_RANK@",
                         endpoint="@ENDPOINT@", run_id=run_id, max_restarts=max_restarts,
                         is_host="@IS_HOST@", python=python)
    header, segment = _header(plan, run_id, plan_hosts)
    env = dict(watchdog_env(dump_dir), MESHPLAN_NNODES=str(plan.nnodes), **(extra_env or {}))
    body = [
        f"# meshplan launch for a {plan.nnodes}-node plan; submit with: sbatch launch.sbatch",
        "set -euo pipefail",
        *_exports(env, segment),
        'mkdir -p -- "$MESHPLAN_DUMP_DIR"',
        'mapfile -t ALLOCATED < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        _bash_array("PLAN_HOSTS", plan_hosts),
        'if ((${#PLAN_HOSTS[@]})); then HEAD_HOST="${PLAN_HOSTS[0]}"; else HEAD_HOST="${ALLOCATED[0]}"; fi',
        f'export MESHPLAN_RDZV_ENDPOINT="${{MESHPLAN_RDZV_ENDPOINT:-$HEAD_HOST:{port}}}"',
        f"srun --nodes={plan.nnodes} --ntasks-per-node=1 "
        '--cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 '
        f"bash -c {q(node_snippet(plan, argv, plan_hosts))} meshplan-node",
    ]
    return "\n".join(header + [""] + body) + "\n"


def supervised_sbatch_script(plan: Plan, script: str, script_args: Sequence[str], *,
                             plan_path: str, run_dir: str, run_id: str, dump_dir: str,
                             plan_hosts: Sequence[str] = (), python: str = DEFAULT_PYTHON,
                             extra_env: dict[str, str] | None = None) -> str:
    """The sbatch script that runs `meshplan run` in the batch step: the supervisor starts one
    node agent per allocated node with `srun --nodes=1 --nodelist=HOST` (its srun launcher),
    watches the ranks over the network (its TCP collector), and on a fault excludes the node,
    re-plans for the nodes left and resumes inside the same allocation. `script_args`: the
    user's, after the trainer contract's --plan/--ckpt-dir that `meshplan run` adds."""
    q = shlex.quote
    header, segment = _header(plan, run_id, plan_hosts)
    env = dict(watchdog_env(dump_dir), MESHPLAN_NNODES=str(plan.nnodes), **(extra_env or {}))
    run = [python, "-m", "planner.cli", "run", plan_path, "--script", script,
           "--launcher", "srun", "--python", python]
    body = [
        f"# meshplan run under SLURM for a {plan.nnodes}-node plan: sbatch launch.supervised.sbatch",
        "# The batch step runs the supervisor; it starts one agent per node with srun, and",
        "# excludes, re-plans and resumes inside this allocation (docs/supervisor.md).",
        "set -euo pipefail",
        *_exports(env, segment),
        'mkdir -p -- "$MESHPLAN_DUMP_DIR"',
        'mapfile -t ALLOCATED < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        _bash_array("PLAN_HOSTS", plan_hosts),
        f'if ((${{#PLAN_HOSTS[@]}})); then HOSTS=("${{PLAN_HOSTS[@]}}"); '
        f'else HOSTS=("${{ALLOCATED[@]:0:{plan.nnodes}}}"); fi',
        'HOST_LIST="$(IFS=,; echo "${HOSTS[*]}")"',
        f'RUN_DIR="${{MESHPLAN_RUN_DIR:-{run_dir}/job-$SLURM_JOB_ID}}"',
        f'exec {" ".join(q(w) for w in run)} --hosts "$HOST_LIST" -o "$RUN_DIR" '
        f'${{MESHPLAN_RUN_OPTS:-}} -- {" ".join(q(a) for a in script_args)}'.rstrip(),
    ]
    return "\n".join(header + [""] + body) + "\n"


def _exports(env: dict[str, str], segment: int) -> list[str]:
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    if segment:
        lines.append('export NCCL_MNNVL_ENABLE="${NCCL_MNNVL_ENABLE:-1}"  # fail, do not fall back to NICs')
    return lines


def _header(plan: Plan, run_id: str, plan_hosts: Sequence[str]) -> tuple[list[str], int]:
    """The #SBATCH lines, and the NVLink segment size (0: none)."""
    header = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={run_id}",
        f"#SBATCH --nodes={plan.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        # The plan uses whole nodes: every CPU and all memory go to the one torchrun task
        # per node and its workers (without, SLURM gives the task one CPU for all of them).
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",
    ]
    if plan.cluster.gpu.name != "CPU":
        header.append(f"#SBATCH --gpus-per-node={plan.gpus_per_node}")
    segment = nvlink_segment(plan)
    if segment:
        header += _segment_lines(plan, segment)
    if plan_hosts and all(_SAFE_SLURM_WORD.match(h) for h in plan_hosts):
        header.append(f"#SBATCH --nodelist={','.join(plan_hosts)}")
    return header, segment


def _segment_lines(plan: Plan, segment: int) -> list[str]:
    """#SBATCH --segment and the comment saying what the plan assumed."""
    per_domain = plan.cluster.nodes_per_domain
    lines = [f"# NVLink domain: {per_domain} nodes ({plan.cluster.domain_gpus} GPUs) share one "
             "fabric; the plan keeps groups inside runs of that many",
             "# consecutive node ranks. --segment needs Slurm >= 24.05 with "
             "TopologyPlugin=topology/block (the racks as base blocks).",
             f"#SBATCH --segment={segment}"]
    if segment < min(per_domain, plan.nnodes):
        lines.insert(2, f"# {plan.nnodes} nodes is not a multiple of {per_domain}: segments of "
                        f"{segment}, so some groups the plan costed inside one domain may span two")
    return lines
