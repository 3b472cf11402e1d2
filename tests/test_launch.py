"""meshplan launch: generated torchrun/SLURM/Kubernetes files and framework arguments.

Framework names are checked against lists taken from the projects' sources:
- tests/data/framework_args_megatron.txt: NVIDIA/Megatron-LM@d98e8a64ddf34856e74b24714e3bedb2f5a39553
  (every option string of megatron.training.arguments.add_megatron_arguments).
- tests/data/framework_args_torchtitan.txt: pytorch/torchtitan@b5bcd76c66d0acb1a08b176d9639425bc55e0b2a
  (fields of torchtitan/config/configs.py sections + activation-checkpoint subcommands).
Pipeline schedule names are checked against the installed torch's get_schedule_class.

Scripts are executed with fake `torchrun`, `srun` and `scontrol` on PATH that record what
they were asked to run; the torchrun fake then runs the worker part (the rank-pinning bash
prologue and the training script) the way torchrun would.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cost_models.specs import Layout, SpecError
from launcher import frameworks
from launcher.artifacts import NodeCommand, render_launch, torchrun_commands, write_launch
from launcher.launch_cli import launch
from launcher.torchrun import parse_hosts_file
from planner.planfile import Plan, read_plan, write_plan
from planner.specfiles import load_cluster, load_model

DATA = Path(__file__).parent / "data"
MEGATRON_COMMIT = "d98e8a64ddf34856e74b24714e3bedb2f5a39553"
TORCHTITAN_COMMIT = "b5bcd76c66d0acb1a08b176d9639425bc55e0b2a"
EVIL = "a b'c\"d;$(touch PWNED)`touch PWNED2`;e"


def make_plan(tp=2, pp=1, vp=1, layers=None, nodes=2, gpn=2, model="tiny-gpt",
              recompute="none", sp=False, cluster="local-cpu", order=None) -> Plan:
    m = load_model(model)
    c = load_cluster(cluster, nodes=nodes, gpus_per_node=gpn if cluster == "local-cpu" else None)
    world = c.world_size
    lay = Layout(tp=tp, pp=pp, dp=world // (tp * pp), vp=vp, micro_batch_size=1,
                 global_batch_size=8 * world, seq_len=32, layers_per_stage=layers,
                 recompute=recompute, sequence_parallel=sp)
    lay.validate(m, world)
    names = tuple(n.name for n in c.nodes)
    return Plan(m, c, lay, order or tuple(reversed(names)), {})


def name_list(path: Path, commit: str) -> set[str]:
    text = path.read_text()
    assert commit in text.splitlines()[0], f"{path} must name commit {commit}"
    return {ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")}


# ------------------------------------------------------------------------------------------
# torchrun commands (the API the supervisor uses)
# ------------------------------------------------------------------------------------------


def test_torchrun_commands_follow_plan_node_order():
    plan = make_plan()
    cmds = torchrun_commands(plan, "train.py", ["--x", "1"], max_restarts=2, run_id="job1")
    assert all(isinstance(c, NodeCommand) for c in cmds)
    assert [(c.node_rank, c.node_name) for c in cmds] == [(0, "localnode1"), (1, "localnode0")]
    argv = cmds[1].argv
    assert argv[0] == "torchrun"
    for flag in ("--nnodes=2:2", "--nproc-per-node=2", "--node-rank=1", "--rdzv-backend=c10d",
                 "--rdzv-endpoint=localnode1:29500", "--rdzv-id=job1", "--max-restarts=2",
                 "--rdzv-conf=is_host=false"):
        assert flag in argv
    assert argv[-3:] == ("train.py", "--x", "1")
    assert cmds[0].env["MESHPLAN_NODE_RANK"] == "0" and cmds[1].env["MESHPLAN_NODE"] == "localnode0"
    for key in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_DUMP_ON_TIMEOUT",
                "TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE"):
        assert cmds[0].env[key]
    # torch 2.13 warns that these old names are deprecated: never exported
    assert not {"TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"} & set(cmds[0].env)
    with pytest.raises(FrozenInstanceError):
        cmds[0].node_rank = 3  # type: ignore[misc]


def test_torchrun_commands_hosts_and_bad_input():
    plan = make_plan()
    cmds = torchrun_commands(plan, "t.py", hosts={"localnode0": "h0", "localnode1": "h1"},
                             rdzv_endpoint="10.0.0.1:1234")
    assert [c.host for c in cmds] == ["h1", "h0"]
    assert "--rdzv-endpoint=10.0.0.1:1234" in cmds[0].argv
    assert "--rdzv-endpoint=h1:29500" in torchrun_commands(plan, "t.py", hosts=["h0", "h1"])[1].argv
    with pytest.raises(SpecError, match="one host per node"):
        torchrun_commands(plan, "t.py", hosts=["h0"])
    with pytest.raises(SpecError, match="HOST:PORT"):
        torchrun_commands(plan, "t.py", rdzv_endpoint="nohostport")
    with pytest.raises(SpecError, match="unknown"):
        torchrun_commands(plan, "t.py", hosts={"localnode0": "a", "bogus": "b"})


def test_hosts_file_forms():
    plan = make_plan()
    assert parse_hosts_file("# c\nlocalnode1 b-host\nlocalnode0 10.0.0.7\n", plan) == {
        "localnode1": "b-host", "localnode0": "10.0.0.7"}
    with pytest.raises(SpecError, match="'n0 host-a'.*not a plan node"):
        parse_hosts_file("n0 host-a\nlocalnode1 b\n", plan)
    with pytest.raises(SpecError, match="not a valid host name"):
        parse_hosts_file("localnode0 a;$(touch)\nlocalnode1 b\n", plan)
    with pytest.raises(SpecError, match="3 fields"):
        parse_hosts_file("localnode0 b host\nlocalnode1 b\n", plan)
    assert parse_hosts_file("h0\n\nh1\n", plan) == ["h0", "h1"]
    with pytest.raises(SpecError, match="mixes"):
        parse_hosts_file("localnode0 a\nh1\n", plan)
    with pytest.raises(SpecError, match="twice"):
        parse_hosts_file("localnode0 a\nlocalnode0 b\n", plan)


# ------------------------------------------------------------------------------------------
# framework arguments
# ------------------------------------------------------------------------------------------


FRAMEWORK_PLANS = [
    dict(tp=2, pp=1), dict(tp=1, pp=2, layers=(3, 5)), dict(tp=2, pp=2, vp=2),
    dict(tp=1, pp=4, gpn=2, nodes=2, layers=(1, 3, 3, 1)),
    dict(tp=1, pp=2, vp=2, layers=(1, 3, 2, 2), recompute="full"),
    dict(tp=2, pp=2, recompute="selective", sp=True),
]


@pytest.mark.parametrize("kw", FRAMEWORK_PLANS)
def test_megatron_flags_are_real(kw):
    known = name_list(DATA / "framework_args_megatron.txt", MEGATRON_COMMIT)
    args = frameworks.megatron_args(make_plan(**kw))
    flags = [a for a in args if a.startswith("--")]
    assert flags and set(flags) <= known, sorted(set(flags) - known)


@pytest.mark.parametrize("kw", FRAMEWORK_PLANS)
def test_torchtitan_names_are_real(kw):
    import torch.distributed.pipelining.schedules as schedules

    known = name_list(DATA / "framework_args_torchtitan.txt", TORCHTITAN_COMMIT)
    args = frameworks.torchtitan_args(make_plan(**kw), "main")  # that list is main's names
    for arg in args:
        if arg in ("--module", "--config"):
            continue
        if arg.startswith("--"):
            assert re.sub(r"\.no-", ".", arg) in known, arg
        elif arg.startswith("activation-checkpoint:"):
            assert arg in known
    if "--parallelism.pipeline_parallel_schedule" in args:
        name = args[args.index("--parallelism.pipeline_parallel_schedule") + 1]
        schedules.get_schedule_class(name)  # raises on unknown names
    config = frameworks.torchtitan_config_py(make_plan(**kw), "main")
    for key in re.findall(r"config\.(\w+\.\w+) =", config):
        assert f"--{key}" in known, key


def test_megatron_pipeline_split_matches_plan_stages():
    flags = frameworks.megatron_pipeline_args
    assert flags(make_plan(tp=1, pp=2, layers=(4, 4))) == []
    assert flags(make_plan(tp=2, pp=2, vp=2)) == ["--num-layers-per-virtual-pipeline-stage", "2"]
    assert flags(make_plan(tp=1, pp=4, layers=(1, 3, 3, 1))) == [
        "--decoder-first-pipeline-num-layers", "1", "--decoder-last-pipeline-num-layers", "1"]
    # Uneven middle stages or interleaved uneven: Megatron's explicit layout, model order.
    assert flags(make_plan(tp=1, pp=4, layers=(1, 2, 4, 1))) == [
        "--pipeline-model-parallel-layout", "Et*1|t*2|t*4|t*1L"]
    assert flags(make_plan(tp=1, pp=2, vp=2, layers=(1, 3, 2, 2))) == [
        "--pipeline-model-parallel-layout", "Et*1|t*3|t*2|t*2L"]


def test_megatron_and_torchtitan_values():
    plan = make_plan(tp=2, pp=2, recompute="full", sp=True)
    args = frameworks.megatron_args(plan)
    pairs = dict(zip(args, args[1:], strict=False))
    assert pairs["--tensor-model-parallel-size"] == "2" and pairs["--pipeline-model-parallel-size"] == "2"
    assert pairs["--micro-batch-size"] == "1" and pairs["--global-batch-size"] == "32"
    assert pairs["--recompute-granularity"] == "full" and "--sequence-parallel" in args
    assert "--use-distributed-optimizer" in args
    titan = frameworks.torchtitan_settings(plan, "main")
    assert titan["parallelism.tensor_parallel_degree"] == 2
    assert titan["parallelism.num_pp_microbatches"] == plan.layout.num_microbatches
    assert titan["training.num_tokens_per_train_step"] == 32 * 32
    assert frameworks.torchtitan_args(plan)[-1] == "activation-checkpoint:full"
    assert frameworks.torchtitan_model_parts(make_plan(tp=1, pp=2, layers=(3, 5)))[0][:2] == [
        "tok_embeddings", "layers.0"]


# ------------------------------------------------------------------------------------------
# running the generated scripts with fakes
# ------------------------------------------------------------------------------------------


FAKE_TORCHRUN = """\
#!{python}
import json, os, subprocess, sys
argv = sys.argv[1:]
with open(os.environ["REC"], "a") as fh:
    fh.write(json.dumps({{"argv": ["torchrun", *argv],
                         "node_rank": os.environ.get("MESHPLAN_NODE_RANK")}}) + "\\n")
worker = argv[argv.index("--no-python") + 1:]
nnodes = int([a for a in argv if a.startswith("--nnodes=")][0].split("=")[1].split(":")[0])
env = dict(os.environ, LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", GROUP_WORLD_SIZE=str(nnodes),
           RANK="99", GROUP_RANK="99")
sys.exit(subprocess.call(worker, env=env))
"""
FAKE_SRUN = """\
#!/usr/bin/env bash
# run the command after srun's options once per allocated node
while [[ "$1" == --* ]]; do shift; done
i=0
while read -r host; do
  SLURM_NODEID=$i SLURMD_NODENAME="$host" "$@" || exit $?
  i=$((i + 1))
done <<< "$FAKE_HOSTS"
"""
FAKE_SCONTROL = """\
#!/usr/bin/env bash
printf '%s\\n' "$FAKE_HOSTS"
"""
TRAIN_PROBE = """\
import json, os, sys
with open(os.environ["REC"], "a") as fh:
    fh.write(json.dumps({"script": sys.argv[0], "args": sys.argv[1:], "rank": os.environ["RANK"],
                         "node": os.environ.get("MESHPLAN_NODE")}) + "\\n")
"""


@pytest.fixture()
def fakes(tmp_path):
    """A bin dir with fake torchrun/srun/scontrol, and an evil-named training script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("torchrun", FAKE_TORCHRUN.format(python=sys.executable)),
                       ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script_dir = tmp_path / EVIL
    script_dir.mkdir()
    script = script_dir / "train.py"
    script.write_text(TRAIN_PROBE)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", REC=str(tmp_path / "rec.jsonl"))
    return tmp_path, script, env


def _records(tmp: Path) -> list[dict]:
    rec = tmp / "rec.jsonl"
    return [json.loads(ln) for ln in rec.read_text().splitlines()] if rec.exists() else []


def _no_injection(tmp: Path) -> None:
    leaks = [p for p in tmp.rglob("PWNED*")] + [p for p in Path.cwd().glob("PWNED*")]
    assert not leaks, f"injected commands ran: {leaks}"


def test_injection_node_scripts_run_intended_command_only(fakes):
    tmp, script, env = fakes
    plan = make_plan()
    hosts = tmp / "hosts"
    hosts.write_text("localnode0 host-zero\nlocalnode1 host-one.example\n")
    out = tmp / f"out {EVIL}"
    write_launch(plan, str(script), out, hosts_file=hosts, script_args=[EVIL, "--n", "1"],
                 python=sys.executable)
    cmds = torchrun_commands(plan, str(script), ["--plan", str(out / "plan.yaml"), EVIL, "--n", "1"],
                             hosts={"localnode0": "host-zero", "localnode1": "host-one.example"},
                             run_id=None, dump_dir=str(out / "nccl_dumps"), python=sys.executable)
    for cmd in cmds:
        subprocess.run(["bash", str(out / f"node-{cmd.node_rank}.sh"), "extra arg"], env=env,
                       cwd=tmp, check=True, timeout=60)
    recs = _records(tmp)
    launched = [r for r in recs if "argv" in r]
    assert [r["argv"] for r in launched] == [[*c.argv, "extra arg"] for c in cmds]
    ran = [r for r in recs if "script" in r]
    assert [r["script"] for r in ran] == [str(script)] * 2
    assert ran[0]["args"] == ["--plan", str(out / "plan.yaml"), EVIL, "--n", "1", "extra arg"]
    # the rank prologue pinned RANK = node_rank * 2 + LOCAL_RANK(1) on the plan's node
    assert [(r["rank"], r["node"]) for r in ran] == [("1", "localnode1"), ("3", "localnode0")]
    _no_injection(tmp)


def hosts_in_plan_order(plan: Plan, cluster_order: list[str]) -> list[str]:
    """The hosts file lists hosts in the cluster's node order; --hosts wants the plan's."""
    names = [n.name for n in plan.cluster.nodes]
    return [cluster_order[names.index(n)] for n in plan.node_order]


def test_supervised_sbatch_execs_meshplan_run_with_the_plan_hosts(fakes):
    tmp, script, env = fakes
    plan = make_plan()
    hosts = tmp / "hosts"
    hosts.write_text("slurm-a\nslurm-b\n")
    fake_py = tmp / "bin" / "fake-python"  # records the argv `meshplan run` would get
    fake_py.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$REC.argv"\n')
    fake_py.chmod(0o755)
    out = tmp / "out"
    write_launch(plan, str(script), out, "slurm", hosts_file=hosts, python=str(fake_py),
                 script_args=[EVIL, "--n", "1"])
    sbatch = out / "launch.supervised.sbatch"
    subprocess.run(["bash", "-n", str(sbatch)], check=True)
    env = dict(env, FAKE_HOSTS="slurm-b\nslurm-a", SLURM_JOB_NODELIST="x", SLURM_JOB_ID="77",
               MESHPLAN_RUN_OPTS="--max-restarts 5")
    subprocess.run(["bash", str(sbatch)], env=env, cwd=tmp, check=True, timeout=60)
    argv = Path(env["REC"] + ".argv").read_text().splitlines()
    assert argv == ["-m", "planner.cli", "run", str(out / "plan.yaml"), "--script", str(script),
                    "--launcher", "srun", "--python", str(fake_py),
                    "--hosts", ",".join(hosts_in_plan_order(plan, ["slurm-a", "slurm-b"])),
                    "-o", str(out / "run" / "job-77"), "--max-restarts", "5", "--",
                    EVIL, "--n", "1"]
    assert "launch.supervised.sbatch" in (out / "README.md").read_text()
    _no_injection(tmp)


def test_sbatch_passes_bash_n_and_runs_per_node(fakes):
    tmp, script, env = fakes
    plan = make_plan()
    hosts = tmp / "hosts"
    hosts.write_text("slurm-a\nslurm-b\n")  # cluster node order: localnode0, localnode1
    out = tmp / "out"
    write_launch(plan, str(script), out, "slurm", hosts_file=hosts, python=sys.executable)
    sbatch = out / "launch.sbatch"
    subprocess.run(["bash", "-n", str(sbatch)], check=True)
    text = sbatch.read_text()
    assert "#SBATCH --nodes=2" in text and "scontrol show hostnames" in text and "srun" in text
    # SLURM allocates in its own order; node ranks still follow the plan (by host name).
    env = dict(env, FAKE_HOSTS="slurm-a\nslurm-b", SLURM_JOB_NODELIST="whatever")
    subprocess.run(["bash", str(sbatch)], env=env, cwd=tmp, check=True, timeout=60)
    launched = [r for r in _records(tmp) if "argv" in r]
    assert [r["node_rank"] for r in launched] == ["1", "0"]
    assert all("--rdzv-endpoint=slurm-b:29500" in r["argv"] for r in launched)
    assert [a for a in launched[0]["argv"] if a.startswith("--node-rank")] == ["--node-rank=1"]
    assert "--rdzv-conf=is_host=true" in launched[1]["argv"]
    ran = [r for r in _records(tmp) if "script" in r]
    assert [(r["rank"], r["node"]) for r in ran] == [("3", "localnode0"), ("1", "localnode1")]
    _no_injection(tmp)


def test_pytorchjob_shape_and_pod_command(fakes):
    tmp, script, env = fakes
    plan = make_plan(nodes=3)
    out = tmp / "out"
    write_launch(plan, str(script), out, "k8s", max_restarts=3, run_id="My_Job.1")
    configmap, job = yaml.safe_load_all((out / "pytorchjob.yaml").read_text())
    assert configmap["kind"] == "ConfigMap" and "plan.yaml" in configmap["data"]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    name = job["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    spec = job["spec"]
    assert spec["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 3, "maxReplicas": 3,
                                     "maxRestarts": 3}
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["image"]
    env_names = {e["name"] for e in container["env"]}
    assert {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_DUMP_ON_TIMEOUT"} <= env_names
    # Run the worker pod's command as the pod "<job>-worker-1" would: node rank 2.
    pod_env = dict(env, HOSTNAME=f"{name}-worker-1", MESHPLAN_K8S_NODE="k8s-node",
                   **{e["name"]: e["value"] for e in container["env"] if "value" in e})
    pod_env["MESHPLAN_DUMP_DIR"] = str(tmp / "pod-dumps")  # the pod's volume, here
    subprocess.run(container["command"], env=pod_env, cwd=tmp, check=True, timeout=60)
    rec = _records(tmp)
    assert rec[0]["node_rank"] == "2" and f"--rdzv-endpoint={name}-master-0:29500" in rec[0]["argv"]
    assert rec[1]["rank"] == "5" and rec[1]["node"] == plan.node_order[2]


# ------------------------------------------------------------------------------------------
# CLI and files
# ------------------------------------------------------------------------------------------


def test_cli_writes_all_artifacts(tmp_path):
    plan_path = tmp_path / "plan.yaml"
    write_plan(make_plan(tp=1, pp=2, layers=(3, 5)), plan_path)
    script = tmp_path / "train.py"
    script.write_text("")
    out = tmp_path / "out"
    res = CliRunner().invoke(launch, [str(plan_path), "--script", str(script), "-o", str(out),
                                      "--backend", "slurm", "--framework", "megatron",
                                      "--", "--data-path", "x y"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["plan.yaml", "node-0.sh", "node-1.sh", "launch.sbatch",
                            "pytorchjob.yaml", "megatron_args.sh", "megatron_bridge_override.py",
                            "torchtitan_args.sh",
                            "torchtitan_config.py", "README.md"])
    assert read_plan(out / "plan.yaml").layout == read_plan(plan_path).layout
    readme = (out / "README.md").read_text()
    assert readme.index("## SLURM") < readme.index("## torchrun")
    node0 = (out / "node-0.sh").read_text()
    assert "--decoder-first-pipeline-num-layers 3" in node0 and "--data-path 'x y'" in node0
    assert os.stat(out / "node-0.sh").st_mode & stat.S_IXUSR
    sourced = subprocess.run(["bash", "-c", f'source "{out}/megatron_args.sh"; printf "%s\\n" '
                              '"${MEGATRON_ARGS[@]}"'], capture_output=True, text=True, check=True)
    assert sourced.stdout.split() == frameworks.megatron_args(read_plan(plan_path))


@pytest.mark.parametrize("args,message", [
    (["missing.yaml", "--script", "{script}", "-o", "{out}"], "does not exist"),
    (["{plan}", "--script", "{tmp}/nope.py", "-o", "{out}"], "training script"),
    (["{plan}", "--script", "{script}", "-o", "{out}", "--hosts", "{tmp}/hosts1"], "one host per node"),
    (["{plan}", "--script", "{script}", "-o", "{out}", "--rdzv-endpoint", "x"], "HOST:PORT"),
    (["{plan}", "--script", "{script}", "-o", "{out}", "--run-id", "a b"], "run id"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    write_plan(make_plan(), tmp_path / "plan.yaml")
    (tmp_path / "train.py").write_text("")
    (tmp_path / "hosts1").write_text("only-one-host\n")
    fill = dict(plan=tmp_path / "plan.yaml", script=tmp_path / "train.py", out=tmp_path / "out",
                tmp=tmp_path)
    argv = [a.format(**fill) for a in args]
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "launch", *argv],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_render_is_pure_and_deterministic(tmp_path):
    plan = make_plan(tp=2, pp=2, vp=2)
    a = render_launch(plan, "/x/train.py", tmp_path / "o")
    b = render_launch(plan, "/x/train.py", tmp_path / "o")
    assert a == b and not (tmp_path / "o").exists()
    assert a["node-0.sh"].startswith("#!/usr/bin/env bash")
