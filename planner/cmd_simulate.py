"""`meshplan simulate PLAN.yaml [--gantt out.png] [--json]`: a second opinion on a plan's step.

The cost model turns the plan's model, cluster and layout into per-stage durations
(`cost_models.step_tasks`); the event-driven simulator plays the pipeline schedule
out op by op; the command prints the simulated step next to the plan's analytic estimate and
can draw the timeline as a Gantt chart.
"""

from __future__ import annotations

from pathlib import Path

import click

from cost_models.simulator import SimResult, StepTasks, simulate_step
from cost_models.specs import SpecError
from planner.fileio import check_output_file
from planner.jsonout import to_json
from planner.planfile import Plan, read_plan


def plan_step_tasks(plan: Plan) -> StepTasks:
    """The cost model's per-stage durations for the plan: the uniform Megatron model on a
    homogeneous cluster, the placement-aware one (actual hop links, per-stage GPUs) when the
    cluster has measured links or mixes NIC kinds / GPU types."""
    from cost_models import step_tasks

    from .engine import resolve_cost_model

    if resolve_cost_model("auto", plan.cluster) == "megatron":
        return step_tasks.uniform(plan.model, plan.cluster, plan.layout)
    from .hetero_search import plan_step_tasks as hetero_step_tasks

    return hetero_step_tasks(plan)


def compare(result: SimResult, plan: Plan) -> dict:
    """Simulated vs analytic step time; difference in % of the analytic value."""
    analytic = plan.estimate.get("step_time_s") if isinstance(plan.estimate, dict) else None
    analytic = float(analytic) if isinstance(analytic, int | float) and analytic > 0 else None
    diff = None if analytic is None else 100.0 * (result.step_time_s - analytic) / analytic
    return {"simulated_step_time_s": result.step_time_s, "analytic_step_time_s": analytic,
            "difference_pct": diff}


def _check_gantt_path(path: Path) -> None:
    """Fail before simulating if the chart could not be written."""
    if path.suffix.lower() != ".png":
        raise SpecError(f"--gantt writes a PNG image; give a path ending in .png, not {path}")
    check_output_file(path, "--gantt")


def _text_report(plan: Plan, result: SimResult, cmp: dict, gantt: Path | None) -> str:
    lay = plan.layout
    ms = 1e3
    lines = [
        f"model {plan.model.name}  tp={lay.tp} pp={lay.pp} dp={lay.dp} cp={lay.cp} vp={lay.vp}  "
        f"m={result.num_microbatches} micro-batches, {result.schedule} schedule",
        f"simulated step  {result.step_time_s * ms:10.2f} ms",
    ]
    if cmp["analytic_step_time_s"] is None:
        lines.append("analytic step   (the plan file has no estimate.step_time_s)")
    else:
        lines += [f"analytic step   {cmp['analytic_step_time_s'] * ms:10.2f} ms",
                  f"difference      {cmp['difference_pct']:+10.2f} %  (simulated vs analytic)"]
    lines.append(f"pipeline phase  {result.pipeline_s * ms:10.2f} ms   "
                 f"mean idle {100 * result.bubble_fraction:.1f}% of the step")
    lines.append("pp rank   busy ms    idle ms")
    rows = zip(result.busy_s, result.idle_s, strict=True)
    lines += [f"{r:7d} {b * ms:9.2f} {i * ms:10.2f}" for r, (b, i) in enumerate(rows)]
    if gantt is not None:
        lines.append(f"Gantt chart written to {gantt}")
    return "\n".join(lines)


@click.command("simulate")
@click.argument("plan_path", metavar="PLAN.yaml", type=click.Path(path_type=Path))
@click.option("--gantt", "gantt_path", type=click.Path(path_type=Path), default=None,
              help="Write the simulated timeline as a PNG Gantt chart.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def simulate(plan_path: Path, gantt_path: Path | None, as_json: bool) -> None:
    """Simulate PLAN.yaml's training step event by event and compare with its estimate."""
    if gantt_path is not None:
        _check_gantt_path(gantt_path)
    plan = read_plan(plan_path)
    result = simulate_step(plan_step_tasks(plan), plan.layout.schedule)
    cmp = compare(result, plan)
    if gantt_path is not None:
        from planner.gantt import render_gantt

        render_gantt(result, gantt_path, title=f"{plan.model.name} {plan_path.name}")
    if as_json:
        out = {**cmp, "simulation": result.summary(),
               "gantt": None if gantt_path is None else str(gantt_path)}
        click.echo(to_json(out))
    else:
        click.echo(_text_report(plan, result, cmp, gantt_path))
