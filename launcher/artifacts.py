"""`meshplan launch`: turn a Plan into launch files that run it.

DIR gets, whatever the backend (the backend only decides what README.md leads with):
    plan.yaml             copy of the plan (the training script reads it: --plan DIR/plan.yaml)
    node-<r>.sh           per-node torchrun command for node rank r (run on that node's host)
    launch.sbatch         SLURM batch script (srun torchrun on every node)
    launch.supervised.sbatch  SLURM batch script running `meshplan run` (framework plain)
    pytorchjob.yaml       ConfigMap (plan.yaml) + Kubeflow PyTorchJob (training-operator v1.9)
    megatron_args.sh      MEGATRON_ARGS=( ... ) bash array for Megatron-LM pretrain_gpt.py (hybrid
                          Mamba models: pretrain_hybrid.py)
    megatron_bridge_override.py  apply_meshplan(cfg) for a Megatron-Bridge recipe
    torchtitan_args.sh    TORCHTITAN_ARGS=( ... ) bash array of torchtitan CLI overrides
    torchtitan_config.py  apply_meshplan(config) for a torchtitan recipe (incl. uneven stages)
                          (the two torchtitan files are not written for hybrid Mamba models)
    README.md             how to start it
The framework decides which arguments the launch files pass to the script: plain (the
meshplan example trainer: --plan DIR/plan.yaml), megatron (MEGATRON_ARGS) or torchtitan.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from cost_models.specs import SpecError
from planner.fileio import read_text, write_atomic
from planner.planfile import Plan, write_plan

from . import bridge, frameworks, k8s, slurm
from .torchrun import (
    DEFAULT_PYTHON,
    NodeCommand,
    default_run_id,
    node_script,
    parse_hosts_file,
    resolve_hosts,
    torchrun_commands,
)
from .torchtitan import DEFAULT_VERSION as TITAN_DEFAULT

__all__ = ["BACKENDS", "FRAMEWORKS", "NodeCommand", "torchrun_commands", "write_launch"]

BACKENDS = ("torchrun", "slurm", "k8s")
FRAMEWORKS = ("plain", "megatron", "torchtitan")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def training_args(plan: Plan, framework: str, plan_path: str, script_args: Sequence[str],
                  titan_version: str = TITAN_DEFAULT) -> list[str]:
    """Arguments the launch files give the training script for `framework`."""
    if framework == "plain":
        return ["--plan", plan_path, *script_args]
    if framework == "megatron":
        return [*frameworks.megatron_args(plan), *script_args]
    if framework == "torchtitan":  # the activation-checkpoint subcommand must come last
        return [*script_args, *frameworks.torchtitan_args(plan, titan_version)]
    raise SpecError(f"unknown framework {framework!r}; use one of {FRAMEWORKS}")


def _bash_array_file(name: str, args: Sequence[str], what: str,
                     env: dict[str, str] | None = None) -> str:
    lines: list[list[str]] = []
    for arg in args:  # one line per flag with its values
        if arg.startswith("-") or not lines:
            lines.append([arg])
        else:
            lines[-1].append(arg)
    body = "\n".join("  " + " ".join(shlex.quote(a) for a in line) for line in lines)
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted((env or {}).items()))
    return (f"# {what}\n# usage: source this file, then pass \"${{{name}[@]}}\"\n{exports}"
            f"{name}=(\n{body}\n)\n")


def _read_hosts(plan: Plan, hosts_file: str | os.PathLike | None) -> dict[str, str] | None:
    if hosts_file is None:
        return None
    text = read_text(Path(hosts_file), "hosts")
    return resolve_hosts(plan, parse_hosts_file(text, plan))


def render_launch(plan: Plan, script: str, out_dir: Path, backend: str = "torchrun",
                  framework: str = "plain", hosts: dict[str, str] | None = None,
                  script_args: Sequence[str] = (), *, rdzv_endpoint: str | None = None,
                  run_id: str | None = None, max_restarts: int = 0,
                  python: str = DEFAULT_PYTHON, image: str = k8s.DEFAULT_IMAGE,
                  torchtitan_version: str = TITAN_DEFAULT) -> dict[str, str]:
    """File name -> text of every artifact (nothing written). out_dir must be absolute."""
    if backend not in BACKENDS:
        raise SpecError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    run_id = run_id or default_run_id(plan)
    if not _RUN_ID.match(run_id):
        raise SpecError(f"run id {run_id!r} must be 1-64 characters of letters, digits, '.', '_', '-'")
    if framework not in FRAMEWORKS:
        raise SpecError(f"unknown framework {framework!r}; use one of {FRAMEWORKS}")
    hybrid = bool(plan.model.layer_pattern)
    if hybrid and framework == "torchtitan":
        raise SpecError(f"model {plan.model.name} is a hybrid (Mamba) model and torchtitan has "
                        "no Mamba layers: use --framework megatron or plain")
    args = training_args(plan, framework, str(out_dir / "plan.yaml"), script_args,
                         torchtitan_version)
    dump_dir = str(out_dir / "nccl_dumps")
    env = frameworks.framework_env(plan, framework)
    cmds = torchrun_commands(plan, script, args, hosts, rdzv_endpoint, run_id, max_restarts,
                             dump_dir=dump_dir, python=python, extra_env=env)
    plan_hosts = [cmd.host for cmd in cmds] if hosts is not None else []
    common = dict(run_id=run_id, max_restarts=max_restarts, dump_dir=dump_dir,
                  plan_hosts=plan_hosts, python=python, extra_env=env)
    files = {f"node-{c.node_rank}.sh": node_script(c, plan.nnodes) for c in cmds}
    files["launch.sbatch"] = slurm.sbatch_script(plan, script, args, **common)
    if framework == "plain":  # `meshplan run` speaks the trainer contract (--plan, --ckpt-dir)
        files["launch.supervised.sbatch"] = slurm.supervised_sbatch_script(
            plan, script, script_args, plan_path=str(out_dir / "plan.yaml"),
            run_dir=str(out_dir / "run"), run_id=run_id, dump_dir=dump_dir,
            plan_hosts=plan_hosts, python=python, extra_env=env)
    files["pytorchjob.yaml"] = k8s.pytorchjob_yaml(plan, script, args, image=image,
                                                   launch_dir=str(out_dir), **common)
    files["megatron_args.sh"] = _bash_array_file(
        "MEGATRON_ARGS", frameworks.megatron_args(plan),
        "Megatron-LM arguments for this plan (NVIDIA/Megatron-LM@d98e8a64 names)",
        frameworks.megatron_env(plan))
    files["megatron_bridge_override.py"] = bridge.recipe_override_py(plan)
    if not hybrid:  # torchtitan has no Mamba layers
        files["torchtitan_args.sh"] = _bash_array_file(
            "TORCHTITAN_ARGS", frameworks.torchtitan_args(plan, torchtitan_version),
            f"torchtitan {torchtitan_version} CLI overrides for this plan")
        files["torchtitan_config.py"] = frameworks.torchtitan_config_py(plan, torchtitan_version)
    notes = frameworks.launch_notes(plan, framework, torchtitan_version)
    files["README.md"] = readme(plan, cmds, backend, framework, out_dir, notes)
    return files


def write_launch(plan: Plan, script: str, out_dir: str | os.PathLike, backend: str = "torchrun",
                 framework: str = "plain", hosts_file: str | os.PathLike | None = None,
                 script_args: Sequence[str] = (), **options) -> list[Path]:
    """Write every launch artifact into out_dir; returns the paths written (plan.yaml first).

    Everything is rendered before anything is written, and each file is written atomically.
    options: rdzv_endpoint, run_id, max_restarts, python, image (see render_launch).
    """
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise SpecError(f"output {out} exists and is not a directory; choose another -o DIR")
    if backend != "k8s" and not Path(script).is_file():
        raise SpecError(f"training script {script} does not exist; give --script PATH to it")
    # Paths on the nodes: absolute, so the scripts work from any directory (DIR and the
    # script must be at the same path on every node: shared filesystem or copies).
    script = script if backend == "k8s" else str(Path(script).absolute())
    files = render_launch(plan, script, out, backend, framework, _read_hosts(plan, hosts_file),
                          script_args, **options)
    try:
        write_plan(plan, out / "plan.yaml")
        written = [out / "plan.yaml"]
        for name, text in files.items():
            path = out / name
            write_atomic(path, text)
            path.chmod(0o755 if name.endswith((".sh", ".sbatch")) else 0o644)
            written.append(path)
    except OSError as exc:
        raise SpecError(f"cannot write launch files to {out}: {exc.strerror or exc}; "
                        "choose a writable -o DIR") from None
    return written


def readme(plan: Plan, cmds: Sequence[NodeCommand], backend: str, framework: str,
           out_dir: Path, notes: Sequence[str] = ()) -> str:
    """README.md of the launch directory; the chosen backend comes first."""
    lay = plan.layout
    sections = {
        "torchrun": _readme_torchrun(cmds, out_dir),
        "slurm": "## SLURM\n\n```\n"
                 f"sbatch {shlex.quote(str(out_dir / 'launch.sbatch'))}\n```\n\n"
                 "Node ranks follow the hosts file (or SLURM's node order without one).\n"
                 + ("\nUnder supervision (`meshplan run` in the batch step starts one node agent "
                    "per node with srun, watches the ranks over the network, and on a fault "
                    "excludes the node, re-plans and resumes inside the allocation; extra "
                    "`meshplan run` options in $MESHPLAN_RUN_OPTS):\n\n```\n"
                    f"sbatch {shlex.quote(str(out_dir / 'launch.supervised.sbatch'))}\n```\n"
                    if framework == "plain" else ""),
        "k8s": "## Kubernetes (Kubeflow training operator)\n\n```\n"
               f"kubectl apply -f {shlex.quote(str(out_dir / 'pytorchjob.yaml'))}\n```\n\n"
               f"Targets {k8s.OPERATOR}. The image must hold the training script; plan.yaml "
               "comes from the ConfigMap in the same file, mounted at this directory's path.\n",
    }
    head = [
        f"# Launch files for {plan.model.name} on {plan.cluster.name}",
        "",
        f"Layout: tp={lay.tp} pp={lay.pp} dp={lay.dp} cp={lay.cp} vp={lay.vp}, micro-batch "
        f"{lay.micro_batch_size}, global batch {lay.global_batch_size}, seq {lay.seq_len}, "
        f"{plan.nnodes} nodes x {plan.gpus_per_node} processes. Framework: {framework}.",
        "",
        "Stages (layers [first, last)): " + ", ".join(
            f"pp{s.pp_rank}.{s.chunk}=[{s.first_layer},{s.last_layer})" for s in plan.stages),
        "",
        "This directory must be at the same path on every node (shared filesystem or a copy).",
        "NCCL hangs/timeouts write flight-recorder dumps to nccl_dumps/ and end the process.",
        "",
    ]
    if notes:
        head += [f"What {framework} will run differently from the plan:", ""]
        head += [f"- {note}" for note in notes] + [""]
    order = [backend] + [b for b in BACKENDS if b != backend]
    return "\n".join(head) + "\n" + "\n".join(sections[b] for b in order)


def _readme_torchrun(cmds: Sequence[NodeCommand], out_dir: Path) -> str:
    lines = ["## torchrun (one command per node)", "",
             "Start every node's script on its host (any order; they wait for each other):", "",
             "```"]
    lines += [f"# on {c.host}  (plan node {c.node_name}, node rank {c.node_rank})\n"
              f"bash {shlex.quote(str(out_dir / f'node-{c.node_rank}.sh'))}" for c in cmds]
    lines += ["```", "", "Arguments after the script name go to the training script.", ""]
    return "\n".join(lines)
