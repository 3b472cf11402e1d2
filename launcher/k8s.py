"""A Kubeflow training-operator `PyTorchJob` (kubeflow.org/v1) for a plan.

One pod per node: Master (replicas 1) + Worker (replicas nnodes-1), torchrun in each with
c10d rendezvous on the master pod (`<job>-master-0`, whose host name torch matches to host
the store). With a hosts file the pods are confined to the plan's Kubernetes nodes (node
affinity on kubernetes.io/hostname, one pod per node) and each pod takes its plan node rank
from the node it landed on (downward API spec.nodeName); without one, the master is node
rank 0 and worker-<i> is node rank i+1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from planner.planfile import Plan
from planner.specfiles import dump_yaml

from .slurm import _bash_array, quote_with_placeholders
from .torchrun import DEFAULT_PYTHON, DEFAULT_RDZV_PORT, torchrun_argv, watchdog_env

DEFAULT_IMAGE = "pytorch/pytorch:latest"


def job_name(run_id: str) -> str:
    """A DNS-1123 name (lowercase alphanumerics and '-', at most 50 chars) from the run id."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:50].strip("-")
    return name or "meshplan"


def pod_snippet(plan: Plan, argv: Sequence[str], plan_hosts: Sequence[str]) -> str:
    """Bash run in each pod: plan node rank from the Kubernetes node (or the pod name)."""
    return "\n".join([
        "set -euo pipefail",
        _bash_array("PLAN_HOSTS", plan_hosts),
        _bash_array("NODE_NAMES", plan.node_order),
        'case "$HOSTNAME" in *-master-0) NODE_RANK=0 ;; *) NODE_RANK=$(( ${HOSTNAME##*-} + 1 )) ;; esac',
        'if ((${#PLAN_HOSTS[@]})); then',
        '  NODE_RANK=""',
        '  for i in "${!PLAN_HOSTS[@]}"; do',
        '    if [ "${PLAN_HOSTS[$i]}" = "$MESHPLAN_K8S_NODE" ]; then NODE_RANK="$i"; fi',
        "  done",
        '  if [ -z "$NODE_RANK" ]; then',
        '    echo "meshplan: Kubernetes node $MESHPLAN_K8S_NODE is not in the plan" >&2; exit 1',
        "  fi",
        "fi",
        'export MESHPLAN_NODE_RANK="$NODE_RANK" MESHPLAN_NODE_NAME="${NODE_NAMES[$NODE_RANK]}"',
        'export MESHPLAN_NODE="$MESHPLAN_NODE_NAME"',
        'mkdir -p -- "$MESHPLAN_DUMP_DIR"',
        "exec " + quote_with_placeholders(argv),
    ]) + "\n"


def _replica(plan: Plan, replicas: int, snippet: str, env: dict[str, str], image: str,
             plan_hosts: Sequence[str]) -> dict:
    container = {
        "name": "pytorch",  # the training operator looks for this container name
        "image": image,
        "command": ["bash", "-c", snippet, "meshplan-node"],
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())]
        + [{"name": "MESHPLAN_K8S_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "ports": [{"name": "pytorchjob-port", "containerPort": DEFAULT_RDZV_PORT}],
    }
    if plan.cluster.gpu.name != "CPU":
        container["resources"] = {"limits": {"nvidia.com/gpu": plan.gpus_per_node}}
    pod: dict = {"containers": [container]}
    if plan_hosts:
        term = {"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": list(plan_hosts)}]}
        pod["affinity"] = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                             {"nodeSelectorTerms": [term]}},
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": {"meshplan/job": env["MESHPLAN_JOB"]}},
                 "topologyKey": "kubernetes.io/hostname"}]},
        }
    return {"replicas": replicas, "restartPolicy": "OnFailure",
            "template": {"metadata": {"labels": {"meshplan/job": env["MESHPLAN_JOB"]}},
                         "spec": pod}}


def pytorchjob(plan: Plan, script: str, script_args: Sequence[str], *, run_id: str,
               max_restarts: int, dump_dir: str, plan_hosts: Sequence[str] = (),
               image: str = DEFAULT_IMAGE, python: str = DEFAULT_PYTHON,
               extra_env: dict[str, str] | None = None) -> dict:
    """The PyTorchJob as a mapping (see pytorchjob_yaml)."""
    name = job_name(run_id)
    endpoint = f"{name}-master-0:{DEFAULT_RDZV_PORT}"
    argv = torchrun_argv(plan, script, script_args, node_rank="@NODE_RANK@", endpoint=endpoint,
                         run_id=run_id, max_restarts=max_restarts, is_host=None, python=python)
    snippet = pod_snippet(plan, argv, plan_hosts)
    env = dict(watchdog_env(dump_dir), MESHPLAN_NNODES=str(plan.nnodes), MESHPLAN_JOB=name,
               **(extra_env or {}))
    specs = {"Master": _replica(plan, 1, snippet, env, image, plan_hosts)}
    if plan.nnodes > 1:
        specs["Worker"] = _replica(plan, plan.nnodes - 1, snippet, env, image, plan_hosts)
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "labels": {"meshplan/job": name}},
        "spec": {
            "nprocPerNode": str(plan.gpus_per_node),
            "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": plan.nnodes,
                              "maxReplicas": plan.nnodes, "maxRestarts": max_restarts},
            "pytorchReplicaSpecs": specs,
        },
    }


def pytorchjob_yaml(plan: Plan, script: str, script_args: Sequence[str], **kwargs) -> str:
    """The PyTorchJob manifest as YAML text (`kubectl apply -f pytorchjob.yaml`)."""
    return dump_yaml(pytorchjob(plan, script, script_args, **kwargs))
