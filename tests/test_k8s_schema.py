"""pytorchjob.yaml is what Kubeflow training-operator v1.9 admits.

- Schema: every PyTorchJob validates against the v1 openAPIV3Schema of the operator's CRD
  (tests/data/kubeflow.org_pytorchjobs.yaml, release-1.9, commit in its header) with
  jsonschema, and has no field the schema does not define (the API server's strict field
  validation; the CRD's schema leaves additionalProperties open, so this is checked apart).
- Webhook: the rules of pkg/webhooks/pytorch/pytorchjob_webhook.go at that commit: the name
  is a DNS-1035 label; elasticPolicy needs Worker replicas; elasticPolicy.nProcPerNode is not
  used with nprocPerNode; replica types are Master/Worker; each has containers with images and
  one named "pytorch"; Master has exactly 1 replica, Worker at least 1.
- Pods: the ConfigMap with plan.yaml is mounted at the launch directory the command reads,
  /dev/shm is memory-backed, CPU and memory are requested, every mount names a volume.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import pytest
import yaml

from launcher.artifacts import render_launch
from planner.planfile import Plan
from planner.specfiles import load_cluster, load_model

sys.path.insert(0, str(Path(__file__).parent))
import launch_plans  # noqa: E402

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra: pip install -e '.[dev]'")

CRD = Path(__file__).parent / "data" / "kubeflow.org_pytorchjobs.yaml"
DOMAIN_CRD = Path(__file__).parent / "data" / "resource.nvidia.com_computedomains.yaml"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
OUT = Path("/shared/launch/run1")


@functools.cache
def _schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def _validator():
    """A validator for the job schema, the schema itself checked once (jsonschema.validate
    re-checks the 8,000-line schema against its metaschema on every call: ~4 s each)."""
    cls = jsonschema.validators.validator_for(_schema())
    cls.check_schema(_schema())
    return cls(_schema())


def _unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields of value that schema does not define (where it defines its properties)."""
    out = []
    if isinstance(value, dict) and "properties" in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, sub in value.items():
            if key not in schema["properties"]:
                out.append(f"{path}.{key}")
            else:
                out += _unknown_fields(sub, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, sub in value.items():
            out += _unknown_fields(sub, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def webhook_errors(job: dict) -> list[str]:
    """pytorchjob_webhook.go validatePyTorchJob, rule by rule."""
    errs, spec = [], job["spec"]
    if not DNS1035.match(job["metadata"]["name"]) or len(job["metadata"]["name"]) > 63:
        errs.append("metadata.name is not a DNS-1035 label")
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if "elasticPolicy" in spec:
        if "Worker" not in replicas:
            errs.append("pytorchReplicaSpecs[Worker] must be configured if elastic policy is used")
        if "nProcPerNode" in spec["elasticPolicy"] and "nprocPerNode" in spec:
            errs.append("elasticPolicy.nProcPerNode must not be used with nprocPerNode")
    if not replicas:
        errs.append("pytorchReplicaSpecs must be required")
    for kind, rspec in replicas.items():
        if kind not in ("Master", "Worker"):
            errs.append(f"replica type {kind} not supported")
        containers = rspec["template"]["spec"].get("containers") or []
        if not containers or any(not c.get("image") for c in containers):
            errs.append(f"{kind}: containers and their images must be specified")
        if not any(c.get("name") == "pytorch" for c in containers):
            errs.append(f"{kind}: must have at least one container with name pytorch")
        n = rspec.get("replicas")
        if kind == "Master" and n != 1:
            errs.append("Master replicas must be 1")
        if kind == "Worker" and n is not None and n < 1:
            errs.append("Worker replicas must be at least 1")
    return errs


def _docs(plan: Plan, framework: str = "plain", hosts=None) -> tuple[dict, dict]:
    files = render_launch(plan, "/app/train.py", OUT, "k8s", framework, hosts)
    configmap, job = yaml.safe_load_all(files["pytorchjob.yaml"])
    return configmap, job


def _plans() -> dict[str, Plan]:
    plans = {k: launch_plans.make(k) for k in launch_plans.ACCEPTANCE}
    m, c = load_model("tiny-gpt"), load_cluster("local-cpu", nodes=2, gpus_per_node=2)
    from cost_models.specs import Layout
    lay = Layout(tp=2, pp=2, dp=1, micro_batch_size=1, global_batch_size=8, seq_len=32)
    plans["local-cpu-2node"] = Plan(m, c, lay, ("localnode1", "localnode0"), {})
    return plans


PLANS = _plans()


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("framework", ["plain", "megatron"])
def test_pytorchjob_valid_for_crd_and_webhook(name, framework):
    plan = PLANS[name]
    configmap, job = _docs(plan, framework)
    schema = _schema()
    _validator().validate(job)
    assert _unknown_fields(job, schema) == []
    assert webhook_errors(job) == []
    assert ("elasticPolicy" in job["spec"]) == (plan.nnodes > 1)
    assert configmap["kind"] == "ConfigMap" and isinstance(configmap["data"]["plan.yaml"], str)
    for rspec in job["spec"]["pytorchReplicaSpecs"].values():
        pod = rspec["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert {m["name"] for m in mounts.values()} <= set(volumes)
        assert volumes[mounts[str(OUT)]["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        if framework == "plain":
            assert f"{OUT}/plan.yaml" in container["command"][2]
        if framework == "megatron" and (plan.layout.tp > 1 or plan.layout.cp > 1):
            # Megatron-FSDP asserts the variable is unset or > 1 (launcher.megatron)
            wanted = {"name": "CUDA_DEVICE_MAX_CONNECTIONS", "value": "1"}
            assert (wanted in container["env"]) == (not plan.layout.fsdp)


def test_one_node_plan_has_no_elastic_policy():
    _, job = _docs(PLANS["8b"])
    assert "elasticPolicy" not in job["spec"] and list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    old = dict(job, spec=dict(job["spec"], elasticPolicy={"rdzvBackend": "c10d"}))
    assert webhook_errors(old) == ["pytorchReplicaSpecs[Worker] must be configured if elastic policy is used"]


def test_schema_check_catches_bad_manifests():
    _, job = _docs(PLANS["local-cpu-2node"])
    schema = _schema()
    bad = dict(job, spec=dict(job["spec"], nprocPerNode=2))  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        _validator().validate(bad)
    typo = dict(job, spec=dict(job["spec"], elasticPolicy={"rdzvBackend": "c10d", "maxReplica": 2}))
    assert _unknown_fields(typo, schema) == [".spec.elasticPolicy.maxReplica"]


def test_job_name_is_dns1035_even_from_a_digit_run_id():
    plan = PLANS["local-cpu-2node"]
    files = render_launch(plan, "/app/train.py", OUT, "k8s", run_id="1st_run")
    job = list(yaml.safe_load_all(files["pytorchjob.yaml"]))[1]
    assert DNS1035.match(job["metadata"]["name"]) and webhook_errors(job) == []


def test_nvl72_job_claims_a_compute_domain_channel_and_stays_in_a_clique():
    """GB200 NVL72: ConfigMap, ComputeDomain (valid for NVIDIA's DRA driver CRD), PyTorchJob
    (valid for the operator's CRD, which defines pod resourceClaims); every pod claims the
    domain's channel, needs a clique-labelled node, and an 18-tray job stays in one clique."""
    crd = yaml.safe_load(DOMAIN_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    domain_schema = version["schema"]["openAPIV3Schema"]
    for trays, required in ((18, True), (72, False)):
        dims = dict(tp=4, pp=3, cp=2, dp=3) if trays == 18 else {}
        plan = launch_plans.nvl72(trays, **dims)
        files = render_launch(plan, "/app/train.py", OUT, "k8s", "megatron")
        configmap, domain, job = yaml.safe_load_all(files["pytorchjob.yaml"])
        assert (configmap["kind"], domain["kind"], job["kind"]) == (
            "ConfigMap", "ComputeDomain", "PyTorchJob")
        assert domain["apiVersion"] == f"{crd['spec']['group']}/v1beta1"
        jsonschema.validate(domain, domain_schema)
        assert _unknown_fields(domain, domain_schema) == []
        assert domain["spec"]["numNodes"] == trays
        template = domain["spec"]["channel"]["resourceClaimTemplate"]["name"]
        _validator().validate(job)
        assert _unknown_fields(job, _schema()) == []
        assert webhook_errors(job) == []
        for rspec in job["spec"]["pytorchReplicaSpecs"].values():
            pod = rspec["template"]["spec"]
            (claim,) = pod["resourceClaims"]
            assert claim["resourceClaimTemplateName"] == template
            (container,) = pod["containers"]
            assert container["resources"]["claims"] == [{"name": claim["name"]}]
            assert {"name": "NCCL_MNNVL_ENABLE", "value": "1"} in container["env"]
            terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == "nvidia.com/gpu.clique"
            together = pod["affinity"]["podAffinity"]
            key = "requiredDuringSchedulingIgnoredDuringExecution" if required else \
                "preferredDuringSchedulingIgnoredDuringExecution"
            assert list(together) == [key], together


def test_one_node_domain_plans_have_no_compute_domain():
    _, job = _docs(PLANS["70b-vp"])  # dgx-h100: NVLink stops at the node
    assert "resourceClaims" not in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
