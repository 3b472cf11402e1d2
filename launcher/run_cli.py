"""`meshplan run`: launch a plan under supervision (detect faults, exclude, re-plan, resume).

See docs/supervisor.md for what is detected, how fast, and what happens next.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from cost_models.specs import SpecError
from planner.jsonout import to_json
from planner.options import _positive, finite_range
from planner.planfile import read_plan

from .link_probe import ProbeConfig
from .monitor import MonitorConfig
from .supervisor import RunOptions, run_summary, supervise


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM to the supervisor unwinds like Ctrl-C, so every attempt's teardown runs.
    raise KeyboardInterrupt


def _words(text: str | None, option: str) -> tuple[str, ...]:
    """'a,b,c' -> ('a', 'b', 'c'); SpecError on an empty item."""
    if text is None:
        return ()
    words = tuple(w.strip() for w in text.split(","))
    if not all(words):
        raise SpecError(f"meshplan run: {option} {text!r} has an empty item; write H1,H2,...")
    return words


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("plan_file", metavar="PLAN.yaml", type=click.Path(dir_okay=False))
@click.option("--script", required=True, type=click.Path(dir_okay=False),
              help="Training script; gets --plan, --ckpt-dir (and --steps) + SCRIPT_ARGS.")
@click.option("--steps", type=int, default=None, callback=_positive, help="Steps to train (passed to the script).")
@click.option("-o", "--out", "out_dir", default="meshplan-run", show_default=True,
              type=click.Path(file_okay=False), help="Run directory (attempts, logs, run.json).")
@click.option("--ckpt-dir", type=click.Path(file_okay=False), default=None,
              help="Checkpoint directory the script resumes from [default: OUT/ckpt].")
@click.option("--incident-log", type=click.Path(dir_okay=False), default=None,
              help="Incident log, JSON lines, appended [default: OUT/incidents.jsonl].")
@click.option("--max-restarts", type=click.IntRange(0, 1000), default=3, show_default=True,
              help="Relaunches allowed after incidents (0: stop at the first).")
@click.option("--on-straggler", type=click.Choice(["exclude", "log"]), default="exclude",
              show_default=True, help="Exclude a persistent straggler's node, or only log it.")
@click.option("--hang-k", type=float, default=3.0, show_default=True, callback=finite_range(1.0, 1000.0),
              help="Hang after no progress for hang-k x median step period ...")
@click.option("--hang-floor", type=float, default=10.0, show_default=True, callback=finite_range(0.0, 86400.0),
              help="... but never sooner than this many seconds.")
@click.option("--startup-timeout", type=float, default=300.0, show_default=True, callback=finite_range(1.0, 86400.0),
              help="Seconds allowed for start-up (before the step period is known).")
@click.option("--dead-after", type=float, default=5.0, show_default=True, callback=finite_range(0.1, 86400.0),
              help="A rank whose heartbeat is this many seconds old is dead.")
@click.option("--heartbeat", type=float, default=1.0, show_default=True, callback=finite_range(0.01, 3600.0),
              help="Heartbeat interval of the ranks, seconds.")
@click.option("--straggler-threshold", type=float, default=0.7, show_default=True, callback=finite_range(0.01, 1.0),
              help="Relative speed score (peer median / own) below which a rank is slow.")
@click.option("--straggler-window", type=int, default=3, show_default=True, callback=_positive,
              help="Steps in each score's rolling median.")
@click.option("--straggler-steps", type=int, default=3, show_default=True, callback=_positive,
              help="Consecutive slow steps before a rank is a persistent straggler.")
@click.option("--straggler-min-excess", type=float, default=0.1, show_default=True,
              callback=finite_range(0.0, 3600.0),
              help="Ignore a rank slower than its peers by less than this many seconds per step.")
@click.option("--poll", type=float, default=0.25, show_default=True, callback=finite_range(0.01, 60.0),
              help="Seconds between looks at the ranks' records.")
@click.option("--launcher", type=click.Choice(["local", "netns", "ssh", "srun"]), default="local",
              show_default=True,
              help="How node agents start: here, `ip netns exec`, `ssh HOST` or `srun` (inside an allocation).")
@click.option("--hosts", default=None,
              help="Comma-separated host per plan node (netns name, ssh host or SLURM node), in node order.")
@click.option("--addresses", default=None,
              help="Comma-separated address per host for the rendezvous [default: the host names].")
@click.option("--collector-bind", default=None,
              help="Where the record collector listens [default: 127.0.0.1 locally, else 0.0.0.0].")
@click.option("--collector-host", default=None,
              help="Address ranks reach the collector at [default: this machine's host name].")
@click.option("--link-probe-every", type=float, default=2.0, show_default=True,
              callback=finite_range(0.0, 3600.0),
              help="Seconds between the node agents' host-pair link probes (multi-host "
                   "launchers, 3+ hosts); 0: off.")
@click.option("--link-probe-mb", type=float, default=4.0, show_default=True,
              callback=finite_range(0.01, 1000.0), help="Megabytes per link probe.")
@click.option("--python", "python", default=None,
              help="Python on the nodes for the agent and torchrun [default: this interpreter].")
@click.option("--no-precompute", is_flag=True,
              help="Do not plan for N-1 / N-2 nodes in the background.")
@click.option("--json", "as_json", is_flag=True, help="Print run.json's object on stdout.")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def run(plan_file: str, script: str, steps: int | None, out_dir: str, ckpt_dir: str | None,
        incident_log: str | None, max_restarts: int, on_straggler: str, hang_k: float,
        hang_floor: float, startup_timeout: float, dead_after: float, heartbeat: float,
        straggler_threshold: float, straggler_window: int, straggler_steps: int,
        straggler_min_excess: float, poll: float, launcher: str, hosts: str | None,
        addresses: str | None, collector_bind: str | None,
        collector_host: str | None, link_probe_every: float, link_probe_mb: float,
        python: str | None,
        no_precompute: bool, as_json: bool,
        script_args: tuple[str, ...]) -> None:
    """Launch PLAN.yaml with torchrun under supervision: on a dead or hung rank, a failed node
    or a persistent straggler, exclude the node, re-plan for the nodes left and resume from
    the latest checkpoint. Arguments after `--` go to the training script."""
    plan = read_plan(plan_file)
    try:
        cfg = MonitorConfig(heartbeat_timeout_s=dead_after, hang_k=hang_k,
                            hang_floor_s=hang_floor, startup_timeout_s=startup_timeout,
                            straggler_threshold=straggler_threshold,
                            straggler_window_steps=straggler_window,
                            straggler_windows=straggler_steps,
                            straggler_min_excess_s=straggler_min_excess)
    except ValueError as exc:
        raise SpecError(f"meshplan run: {exc}") from None
    host_list = _words(hosts, "--hosts")
    if launcher != "local" and not host_list:
        raise SpecError(f"meshplan run: --launcher {launcher} needs --hosts H1,H2,... "
                        f"(one per plan node, {plan.nnodes} here)")
    opts = RunOptions(
        script=Path(script), out_dir=Path(out_dir), script_args=tuple(script_args), steps=steps,
        ckpt_dir=Path(ckpt_dir) if ckpt_dir else None,
        incident_log=Path(incident_log) if incident_log else None, max_restarts=max_restarts,
        straggler_action=on_straggler, monitor=cfg, poll_s=poll, heartbeat_s=heartbeat,
        launcher=launcher, hosts=host_list, addresses=_words(addresses, "--addresses"),
        collector_bind=collector_bind or ("127.0.0.1" if launcher == "local" else "0.0.0.0"),
        collector_host=collector_host, precompute=not no_precompute, python=python,
        link_probe=(ProbeConfig(period_s=link_probe_every, nbytes=int(link_probe_mb * 1e6))
                    if link_probe_every > 0 else None))
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = supervise(plan, opts, echo=lambda line: click.echo(f"[meshplan run] {line}",
                                                                     err=True))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        click.echo(to_json(run_summary(result)))
    else:
        where = (f"incidents in {opts.log_path}" if opts.log_path.exists()
                 else "no incident was logged")
        click.echo(f"{'ok' if result.ok else 'FAILED'}: {result.message}; {where}")
    if not result.ok:
        sys.exit(1)
