"""A Kubeflow training-operator `PyTorchJob` (kubeflow.org/v1) for a plan, and its ConfigMap.

Target: training-operator v1.9 (branch release-1.9), whose CRD and admission webhook
(pkg/webhooks/pytorch/pytorchjob_webhook.go) this manifest is checked against in
tests/test_k8s_schema.py. The PyTorchJob CRD is gone from training-operator's main branch
(Kubeflow Trainer v2 replaces it with TrainJob); this file does not target Trainer v2.

One pod per node: Master (replicas 1) + Worker (replicas nnodes-1), torchrun in each with
c10d rendezvous on the master pod (`<job>-master-0`, whose host name torch matches to host
the store). The webhook allows `elasticPolicy` only with Worker replicas, so a one-node plan
(Master only) has none; the layout's world size is fixed anyway (min = max replicas).

Each pod mounts the launch directory's plan.yaml from the ConfigMap `<job>-launch` at the
launch directory's path (read-only; the plain trainer reads DIR/plan.yaml), a memory-backed
/dev/shm (dataloader workers and NCCL need more than the runtime's 64 MiB default), and an
emptyDir for flight-recorder dumps. Pods request CPUs and memory per process
(CPUS_PER_PROCESS, MEMORY_PER_PROCESS_GiB) besides their GPUs. With a hosts file the pods are confined to the plan's Kubernetes nodes (node
affinity on kubernetes.io/hostname, one pod per node) and each pod takes its plan node rank
from the node it landed on (downward API spec.nodeName); without one, the master is node
rank 0 and worker-<i> is node rank i+1.

NVLink domains larger than a node (GB200/GB300 NVL72): the rack is the placement unit. The
manifest adds a ComputeDomain (resource.nvidia.com/v1beta1, NVIDIA DRA driver for GPUs,
k8s-dra-driver-gpu; CRD in tests/data) whose channel ResourceClaimTemplate every pod claims, so
each pod gets its IMEX channel (/dev/nvidia-caps-imex-channels); pods run only on nodes with the
`nvidia.com/gpu.clique` label (GPU Feature Discovery: <cluster UUID>.<clique id>, one clique
per NVLink domain), a plan that fits one domain is held to one clique (required pod affinity,
topologyKey nvidia.com/gpu.clique), a larger one is packed into as few cliques as the scheduler
finds (preferred affinity: a PyTorchJob has one pod template, so it cannot say which pods share
a rack; list the hosts rack by rack in a hosts file to fix the placement). NCCL_MNNVL_ENABLE=1
makes NCCL fail rather than fall back to the NICs when the fabric is missing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from planner.planfile import Plan
from planner.specfiles import dump_yaml

from .slurm import _bash_array, quote_with_placeholders
from .torchrun import DEFAULT_PYTHON, DEFAULT_RDZV_PORT, torchrun_argv, watchdog_env

DEFAULT_IMAGE = "pytorch/pytorch:latest"
CLIQUE_LABEL = "nvidia.com/gpu.clique"
"""Node label GPU Feature Discovery sets on multi-node-NVLink nodes (k8s-dra-driver-gpu
docs/install.md)."""
CHANNEL_CLAIM = "imex-channel"
OPERATOR = "Kubeflow training-operator v1.9 (release-1.9)"
K8S_DUMP_DIR = "/var/log/meshplan/nccl_dumps"
CPUS_PER_PROCESS = 4
MEMORY_PER_PROCESS_GiB = 16


def job_name(run_id: str) -> str:
    """A DNS-1035 label (lowercase alphanumerics and '-', starting with a letter, at most 50
    chars: the webhook's rule for the job name) from the run id."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = "mp-" + name
    return name[:50].strip("-")


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


def _resources(plan: Plan) -> dict:
    procs = plan.gpus_per_node
    cpu = CPUS_PER_PROCESS * procs if plan.cluster.gpu.name != "CPU" else procs
    mem = MEMORY_PER_PROCESS_GiB * procs if plan.cluster.gpu.name != "CPU" else 2 * procs
    out: dict = {"requests": {"cpu": str(cpu), "memory": f"{mem}Gi"}}
    if plan.cluster.gpu.name != "CPU":
        out["limits"] = {"nvidia.com/gpu": procs}
        out["requests"]["nvidia.com/gpu"] = procs
    return out


def _volumes(name: str, launch_dir: str) -> tuple[list[dict], list[dict]]:
    volumes = [
        {"name": "launch", "configMap": {"name": f"{name}-launch"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "dumps", "emptyDir": {}},
    ]
    mounts = [
        {"name": "launch", "mountPath": launch_dir, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "dumps", "mountPath": K8S_DUMP_DIR},
    ]
    return volumes, mounts


def nvlink_domain_plan(plan: Plan) -> bool:
    """The plan runs groups over an NVLink fabric joining several nodes (GPU clusters only)."""
    return plan.cluster.nodes_per_domain > 1 and plan.cluster.gpu.name != "CPU"


def compute_domain(plan: Plan, name: str) -> dict:
    """The ComputeDomain whose IMEX channel the job's pods claim (numNodes: the plan's nodes;
    the CRD deprecates it but needs it when the driver's IMEXDaemonsWithDNSNames gate is off)."""
    return {"apiVersion": "resource.nvidia.com/v1beta1", "kind": "ComputeDomain",
            "metadata": {"name": f"{name}-domain", "labels": {"meshplan/job": name}},
            "spec": {"numNodes": plan.nnodes,
                     "channel": {"resourceClaimTemplate": {"name": f"{name}-channel"}}}}


def _rack_affinity(plan: Plan, job: str) -> dict:
    """Node affinity on the clique label and pod affinity keeping the job in one clique
    (required when the plan fits one NVLink domain, preferred otherwise)."""
    term = {"labelSelector": {"matchLabels": {"meshplan/job": job}}, "topologyKey": CLIQUE_LABEL}
    together = ({"requiredDuringSchedulingIgnoredDuringExecution": [term]}
                if plan.nnodes <= plan.cluster.nodes_per_domain else
                {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 100, "podAffinityTerm": term}]})
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": CLIQUE_LABEL, "operator": "Exists"}]}]}},
            "podAffinity": together}


def _replica(plan: Plan, replicas: int, snippet: str, env: dict[str, str], image: str,
             plan_hosts: Sequence[str], launch_dir: str) -> dict:
    volumes, mounts = _volumes(env["MESHPLAN_JOB"], launch_dir)
    container = {
        "name": "pytorch",  # the training operator looks for this container name
        "image": image,
        "command": ["bash", "-c", snippet, "meshplan-node"],
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())]
        + [{"name": "MESHPLAN_K8S_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "ports": [{"name": "pytorchjob-port", "containerPort": DEFAULT_RDZV_PORT}],
        "resources": _resources(plan),
        "volumeMounts": mounts,
    }
    pod: dict = {"containers": [container], "volumes": volumes}
    job = env["MESHPLAN_JOB"]
    if nvlink_domain_plan(plan):
        container["resources"]["claims"] = [{"name": CHANNEL_CLAIM}]
        pod["resourceClaims"] = [{"name": CHANNEL_CLAIM,
                                  "resourceClaimTemplateName": f"{job}-channel"}]
        if not plan_hosts:
            pod["affinity"] = _rack_affinity(plan, job)
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
               max_restarts: int, dump_dir: str = K8S_DUMP_DIR, plan_hosts: Sequence[str] = (),
               image: str = DEFAULT_IMAGE, python: str = DEFAULT_PYTHON,
               extra_env: dict[str, str] | None = None, launch_dir: str = "/meshplan") -> dict:
    """The PyTorchJob as a mapping (see pytorchjob_yaml). dump_dir is ignored: pods write
    flight-recorder dumps to their K8S_DUMP_DIR volume."""
    dump_dir = K8S_DUMP_DIR
    name = job_name(run_id)
    endpoint = f"{name}-master-0:{DEFAULT_RDZV_PORT}"
    argv = torchrun_argv(plan, script, script_args, node_rank="@NODE_RANK@", endpoint=endpoint,
                         run_id=run_id, max_restarts=max_restarts, is_host=None, python=python)
    snippet = pod_snippet(plan, argv, plan_hosts)
    env = {**watchdog_env(dump_dir), "MESHPLAN_NNODES": str(plan.nnodes), "MESHPLAN_JOB": name,
           **({"NCCL_MNNVL_ENABLE": "1"} if nvlink_domain_plan(plan) else {}),
           **(extra_env or {})}  # the user's environment wins
    specs = {"Master": _replica(plan, 1, snippet, env, image, plan_hosts, launch_dir)}
    spec: dict = {"nprocPerNode": str(plan.gpus_per_node)}
    if plan.nnodes > 1:
        specs["Worker"] = _replica(plan, plan.nnodes - 1, snippet, env, image, plan_hosts,
                                   launch_dir)
        spec["elasticPolicy"] = {"rdzvBackend": "c10d", "minReplicas": plan.nnodes,
                                 "maxReplicas": plan.nnodes, "maxRestarts": max_restarts}
    spec["pytorchReplicaSpecs"] = specs
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "labels": {"meshplan/job": name}}, "spec": spec}


def launch_configmap(plan: Plan, run_id: str) -> dict:
    """The ConfigMap holding plan.yaml, mounted at the launch directory in every pod."""
    name = job_name(run_id)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{name}-launch", "labels": {"meshplan/job": name}},
            "data": {"plan.yaml": dump_yaml(plan.to_dict())}}


def pytorchjob_yaml(plan: Plan, script: str, script_args: Sequence[str], **kwargs) -> str:
    """ConfigMap + PyTorchJob as one multi-document YAML (`kubectl apply -f pytorchjob.yaml`)."""
    head = (f"# {OPERATOR} PyTorchJob (kubeflow.org/v1) and the ConfigMap it mounts.\n"
            "# Not for Kubeflow Trainer v2 (TrainJob), which replaced PyTorchJob on main.\n")
    domain = ""
    if nvlink_domain_plan(plan):  # before the job: its pods claim the domain's channel
        domain = dump_yaml(compute_domain(plan, job_name(kwargs["run_id"]))) + "---\n"
        head += ("# The ComputeDomain needs NVIDIA's DRA driver for GPUs (k8s-dra-driver-gpu) "
                 "and GPU Feature Discovery's nvidia.com/gpu.clique node labels.\n")
    return (head + dump_yaml(launch_configmap(plan, kwargs["run_id"])) + "---\n" + domain
            + dump_yaml(pytorchjob(plan, script, script_args, **kwargs)))
