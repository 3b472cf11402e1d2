"""`meshplan plan`: search all valid layouts, rank the fastest that fit, explain the winner.

Example:
    meshplan plan --model llama3.1-70b --cluster dgx-h100 --nodes 8 --seq-len 8192 \
        --global-batch-size 128 -o plan.yaml

Exit status: 0 a plan was found, 3 nothing fits (advice printed), 2 bad input.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import click
from rich.console import Console
from rich.table import Table

from cost_models import recompute_modules
from cost_models.schedules import SCHEDULES
from cost_models.specs import RECOMPUTE_KINDS, SpecError

from . import engine
from .explain import advise, explain, group_spans, spans_lines
from .fileio import check_output_file
from .jsonout import to_json
from .options import (
    DEFAULT_PLAN_HEADROOM,
    MODULES_HELP,
    _positive,
    check_sharding,
    check_titan,
    expert_imbalance_option,
    finite_range,
    graph_module_list,
    module_list,
    moe_options,
    problem_options,
    resolve_problem,
    sharding_options,
    with_expert_imbalance,
)
from .planfile import Plan, stage_ranges, write_plan
from .progress import progress
from .report import cli_console, layout_label
from .search import SearchResult, SearchSpace, refinable
from .validation import validation_of


@click.command("plan")
@problem_options
@expert_imbalance_option
@click.option("--top-k", type=int, default=5, show_default=True, callback=_positive,
              help="How many ranked layouts to show.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False),
              help="Write the best plan to this plan.yaml.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write an HTML report.")
@click.option("--tp", type=int, callback=_positive, help="Fix the tensor-parallel degree.")
@click.option("--pp", type=int, callback=_positive, help="Fix the pipeline-parallel degree.")
@click.option("--cp", type=int, callback=_positive, help="Fix the context-parallel degree.")
@click.option("--vp", type=int, callback=_positive, help="Fix the virtual stages per rank.")
@click.option("--dp", type=int, callback=_positive, help="Fix the data-parallel degree.")
@click.option("--ep", type=int, callback=_positive, help="Fix the expert-parallel degree (MoE).")
@click.option("--etp", type=int, callback=_positive,
              help="Fix the expert tensor-parallel degree (MoE) [default: search every valid one up to --max-tp].")
@click.option("--micro-batch-size", "--mbs", "micro_batch_size", type=int, callback=_positive,
              help="Fix the micro-batch size.")
@click.option("--recompute", type=click.Choice(RECOMPUTE_KINDS), multiple=True,
              help="Allowed recompute settings (repeatable) [default: all].")
@click.option("--recompute-modules", "module_lists", multiple=True,
              help="A module list to try with selective recompute (repeatable): "
                   + MODULES_HELP + " [default: the model's search sets, docs/planning.md].")
@click.option("--mem-headroom", type=float, default=DEFAULT_PLAN_HEADROOM, show_default=True,
              callback=finite_range(0.0, 0.5), help="Fraction of GPU memory to keep free.")
@click.option("--max-tp", type=int, callback=_positive,
              help="Largest tp (default: one node's GPUs, or up to 8 GPUs of an NVLink "
                   "domain larger than a node, e.g. 2 trays of a GB200 NVL72).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="Fix the pipeline schedule [default: search all of them].")
@sharding_options
@moe_options(a2a_default=True)
@click.option("--consider-fsdp", is_flag=True,
              help="Search FSDP layouts alongside Megatron DP / distributed optimizer ones "
                   "(--fsdp: FSDP only).")
def plan(model, cluster, nodes, gpus_per_node, seq_len, global_batch_size, dtype, cost_model,
         as_json, top_k, output, report, micro_batch_size, recompute, module_lists, mem_headroom,
         max_tp,
         expert_imbalance, mtp_layers, schedule, fsdp, dp_replicate, fsdp_strategy,
         fsdp_reshard_after_forward, grad_reduce_fp32, framework,
         consider_fsdp, torch_compile, async_tp, moe_dispatcher, moe_a2a_overlap,
         te_cross_entropy, cuda_graph_modules, **degrees):
    """Rank every valid TP/PP/CP/DP layout and write the fastest one that fits."""
    check_sharding(fsdp or consider_fsdp, dp_replicate, fsdp_strategy, framework,
                   fsdp_reshard_after_forward)
    check_titan(framework, torch_compile, async_tp)
    for path, option in ((output, "-o"), (report, "--report")):
        if path:
            check_output_file(path, option)
    prob = with_expert_imbalance(resolve_problem(
        model, cluster, nodes, gpus_per_node, seq_len, global_batch_size, dtype, cost_model),
        expert_imbalance, mtp_layers)
    space = SearchSpace(dtype=dtype, recompute=tuple(recompute) or RECOMPUTE_KINDS,
                        headroom=mem_headroom, max_tp=max_tp, micro_batch_size=micro_batch_size,
                        schedule=schedule,
                        fsdp=(True,) if fsdp else (False, True) if consider_fsdp else (False,),
                        dp_replicate=dp_replicate, fsdp_strategy=fsdp_strategy,
                        fsdp_reshard_after_forward=fsdp_reshard_after_forward,
                        grad_reduce_fp32=grad_reduce_fp32,
                        framework=framework, torch_compile=torch_compile, async_tp=async_tp,
                        recompute_modules=_module_lists(prob.model, module_lists),
                        moe_a2a_overlap=moe_a2a_overlap, moe_dispatcher=moe_dispatcher,
                        cuda_graph_modules=graph_module_list(cuda_graph_modules),
                        te_cross_entropy=te_cross_entropy,
                        **degrees)
    console = cli_console(stderr=as_json)
    with progress(f"planning {prob.model.name} on {prob.cluster.world_size:,} GPUs"):
        planned = engine.plan(prob, space, top_k)
    res, hs, plans = planned.result, planned.hetero, list(planned.plans)
    if res.idle_nodes:
        console.print(f"[yellow]warning[/yellow]: no valid layout uses all {prob.cluster.num_nodes} "
                      f"nodes; planning for {res.cluster.num_nodes} and leaving "
                      f"{len(res.idle_nodes)} idle ({', '.join(res.idle_nodes[:4])})")
    advice = []
    if not res.plans and hs is None:
        with progress("nothing fits; searching what would (more GPUs, recompute, fp8)"):
            advice = advise(replace(prob, cluster=res.cluster), space, res.nearest)
    line, band = validation_of(res.cluster, prob.model.is_moe,
                               "megatron" if hs is None else "hetero")
    if as_json:
        out = _json(res, plans, with_groups=hs is None)
        out["validation"] = band
        if advice:
            out["advice"] = advice
        out["search"]["mem_headroom"] = mem_headroom
        if hs is not None:
            out["search"]["placement"] = _placement_json(hs)
        click.echo(to_json(out))
    else:
        _print(console, prob, res, mem_headroom, line)
        if hs is None and res.plans:  # uniform placement: rank r on node r // gpus_per_node
            for line in spans_lines(res.plans[0].layout, res.cluster):
                console.print(line, highlight=False)
        if hs is not None:
            _print_placement(console, hs)
    if not res.plans:
        if not as_json:  # the report's last part: stderr keeps the one error line
            for line in advice:
                console.print(f"  {line}")
        hint = (f"see the suggestions {'above' if not as_json else 'under advice'}" if advice else
                "allow recompute (--recompute full), or add nodes or GPUs with more memory")
        click.echo(f"error: no layout of {prob.model.name} fits on {res.cluster.world_size} "
                   f"{_gpu_label(res.cluster)} GPUs ({res.candidates} valid layouts tried); "
                   f"{hint}", err=True)
        sys.exit(3)
    if output:
        write_plan(plans[0], output)
        if not as_json:
            console.print(f"wrote {output}")
    if report:
        from .html_report import write_report

        write_report(report, plans, hs if hs is not None else res)
        if not as_json:
            console.print(f"wrote {report}")


def _gpu_label(cluster) -> str:
    """'H100-SXM', or 'A100-80GB/H100-SXM' for a cluster mixing GPU types."""
    return "/".join(sorted({n.gpu for n in cluster.nodes}))


def _placement_json(hs) -> list[dict]:
    """Per ranked plan: where its node order and layer split came from (solver status, gap);
    the winner also says where slow hosts went."""
    return [{"source": p.placement, **({"slow_hosts": list(hs.slow_hosts)} if i == 0 else {}), "placement_status": p.placement_status,
             "partition_status": p.partition_status, "critical_stage": p.result.critical_stage,
             "critical_replica": p.result.critical_replica, "stage_gpu": list(p.result.stage_gpu)}
            for i, p in enumerate(hs.placed)]


def _print_placement(console: Console, hs) -> None:
    """Which nodes run each pipeline stage of the winner, and how the placement was found."""
    from cost_models.hetero_model import rank_nodes

    if not hs.placed:
        return
    best = hs.placed[0]
    lay = best.result.estimate.layout
    names = [n.name for n in hs.result.cluster.nodes]
    where = rank_nodes(lay, hs.result.cluster.gpus_per_node, best.node_order)
    console.print(f"placement ({hs.style} cost model): {best.placement}, solver "
                  f"{best.placement_status}; layer split: {best.partition_status}")
    for s in range(lay.pp):
        nodes = ", ".join(names[i] for i in dict.fromkeys(where[s].ravel().tolist()))
        console.print(f"  stage {s} ({best.result.stage_gpu[s]}): {nodes}")
    for line in hs.slow_hosts:
        console.print(f"  {line}")


def _json(res: SearchResult, plans: list[Plan], with_groups: bool = True) -> dict:
    """`plan --json`; each plan's `groups` (uniform placement only) says where its tp, cp, ep,
    dp groups and pp hops run (`explain.group_spans`)."""
    out = []
    for p in plans:
        d = p.layout_dict()
        out.append({"layout": d["layout"], "estimate": d["estimate"],
                    "placement": {**d["placement"], "stages": d["stages"]}})
        if with_groups:
            out[-1]["groups"] = [g.to_dict() for g in group_spans(p.layout, res.cluster)]
    return {
        "plans": out,
        "search": {"candidates": res.candidates, "feasible": res.feasible, "pruned": res.pruned,
                   "dominated": res.dominated,
                   "seconds": round(res.seconds, 4), "rate_per_s": round(res.rate),
                   "solver": res.solver, "idle_nodes": list(res.idle_nodes)},
    }


def _split_note(res: SearchResult) -> str:
    """How the leaders' layers were split across stages."""
    if res.solver != "none":
        return f"layer split by ILP ({res.solver})"
    if res.plans and res.plans[0].layout.pp > 1:
        if not refinable(res.plans[0].layout):
            return "even layer split (the partition ILP models looped stages, not V or DualPipe)"
        return "even layer split (meets the exact lower bound: no ILP needed)"
    return "no pipeline to split"


def _print(console: Console, prob, res: SearchResult, headroom: float,
           validation: str | None = None) -> None:
    c = res.cluster
    console.print(f"[b]{prob.model.name}[/b] on {c.world_size} x {_gpu_label(c)} "
                  f"({c.num_nodes} nodes), seq {prob.seq_len}, global batch "
                  f"{prob.global_batch_size}, {prob.dtype}")
    table = Table(show_edge=False, title=f"Top {len(res.plans)} layouts that fit")
    for col in ("#", "layout", "step s", "tokens/s", "MFU", "GiB/GPU", "bubble", "comm"):
        table.add_column(col, justify="left" if col == "layout" else "right",
                         no_wrap=col == "layout")
    for i, e in enumerate(res.plans, 1):
        t = e.time
        comm = t.comm_s / e.step_time_s
        table.add_row(str(i), layout_label(e.layout), f"{e.step_time_s:.3f}",
                      f"{e.tokens_per_s:,.0f}", f"{100 * e.mfu:.1f}%",
                      f"{e.peak_GiB:.1f}", f"{100 * t.pp_bubble_s / e.step_time_s:.1f}%",
                      f"{100 * comm:.1f}%")
    if res.plans:
        console.print(table)
    console.print(f"searched {res.valid:,} valid layouts ({res.feasible:,} fit "
                  f"with {100 * headroom:g}% of memory kept free{res.skipped_note('; ')}) in "
                  f"{res.seconds:.2f} s ({res.rate:,.0f} evaluated/s); {_split_note(res)}")
    console.print("[dim]MFU = model FLOPs (causal attention, no recompute) / dense "
                  f"{prob.dtype} peak[/dim]")
    if validation and res.plans:
        console.print(validation, highlight=False, soft_wrap=True)
    for line in explain(res.plans, res.alternatives):
        console.print(line)
    if res.plans and res.plans[0].layout.layers_per_stage:
        best = res.plans[0]
        stages = stage_ranges(best.layout, prob.model.num_layers)
        console.print("layers per stage: " + " ".join(str(s.num_layers) for s in stages))


def _module_lists(model, texts: tuple[str, ...]) -> tuple[tuple[str, ...], ...] | None:
    """--recompute-modules values as module lists, each checked against the model."""
    if not texts:
        return None
    lists = tuple(module_list(t) for t in texts)
    for mods in lists:
        problem = recompute_modules.check(model, mods)
        if problem:
            raise SpecError(f"--recompute-modules {','.join(mods)[:80]}: {problem}")
    return lists
