"""`meshplan launch PLAN.yaml --script PATH -o DIR [-- SCRIPT_ARGS]` (see launcher/artifacts.py)."""

from __future__ import annotations

import click

from planner.planfile import read_plan

from .artifacts import BACKENDS, FRAMEWORKS, write_launch
from .frameworks import TITAN_VERSIONS, launch_notes
from .k8s import DEFAULT_IMAGE
from .torchrun import DEFAULT_PYTHON
from .torchtitan import DEFAULT_VERSION


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("plan_file", metavar="PLAN.yaml", type=click.Path(dir_okay=False))
@click.option("--script", required=True, help="Training script each process runs.")
@click.option("--backend", type=click.Choice(BACKENDS), default="torchrun", show_default=True,
              help="What README.md leads with (every backend's files are written).")
@click.option("--framework", type=click.Choice(FRAMEWORKS), default="plain", show_default=True,
              help="plain: script gets --plan DIR/plan.yaml; megatron/torchtitan: their flags.")
@click.option("--hosts", "hosts_file", type=click.Path(dir_okay=False),
              help="Hosts file: 'NODE HOST' per line, or one HOST per line in cluster node order.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write the launch files to.")
@click.option("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (default: node rank 0's host:29500).")
@click.option("--run-id", help="Rendezvous/job id (default: derived from the plan).")
@click.option("--max-restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="torchrun worker-group restarts before the job fails.")
@click.option("--python", default=DEFAULT_PYTHON, show_default=True,
              help="Python interpreter on the nodes.")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="Container image (k8s).")
@click.option("--torchtitan-version", type=click.Choice(TITAN_VERSIONS), default=DEFAULT_VERSION,
              show_default=True, help="torchtitan config names: the PyPI release or main.")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def launch(plan_file, script, backend, framework, hosts_file, out_dir, rdzv_endpoint, run_id,
           max_restarts, python, image, torchtitan_version, script_args):
    """Write torchrun / SLURM / Kubernetes launch files for PLAN.yaml into DIR.

    Arguments after `--` are passed to the training script.
    """
    plan = read_plan(plan_file)
    paths = write_launch(plan, script, out_dir, backend, framework, hosts_file, script_args,
                         rdzv_endpoint=rdzv_endpoint, run_id=run_id, max_restarts=max_restarts,
                         python=python, image=image, torchtitan_version=torchtitan_version)
    for note in launch_notes(plan, framework, torchtitan_version):
        click.echo(f"meshplan launch: note: {note}", err=True)
    click.echo(f"wrote {len(paths)} files to {paths[0].parent}; start it as README.md says")
