"""`meshplan estimate`: predict step time and memory of one layout.

Example:
    meshplan estimate --model llama3.1-70b --cluster dgx-h100 --nodes 8 --seq-len 8192 \
        --global-batch-size 128 --tp 4 --pp 4 --cp 2 --vp 5 --micro-batch-size 1 --json

Exit status: 0 fits, 3 does not fit (the estimate is still printed), 2 bad input.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import click

from cost_models.dims import ParallelDims
from cost_models.schedules import SCHEDULES, default_schedule
from cost_models.specs import RECOMPUTE_KINDS, Layout, a2a_overlap_problem

from .engine import estimate_layout
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
from .report import print_estimate
from .validation import validation_of
from .verdict import TIGHT_FRACTION, memory_verdict


@click.command("estimate")
@problem_options
@expert_imbalance_option
@click.option("--tp", type=int, required=True, callback=_positive, help="Tensor-parallel degree.")
@click.option("--pp", type=int, required=True, callback=_positive, help="Pipeline-parallel degree.")
@click.option("--cp", type=int, default=1, show_default=True, callback=_positive,
              help="Context-parallel degree.")
@click.option("--ep", type=int, default=1, show_default=True, callback=_positive,
              help="Expert-parallel degree (MoE).")
@click.option("--etp", type=int, callback=_positive,
              help="Expert tensor-parallel degree (MoE) [default: tp, as Megatron-Core]; "
                   "etp*ep must divide tp*cp*dp.")
@click.option("--vp", type=int, default=1, show_default=True, callback=_positive,
              help="Virtual pipeline stages per rank (>1: interleaved 1F1B).")
@click.option("--dp", type=int, callback=_positive,
              help="Data-parallel degree; derived as GPUs/(tp*pp*cp), checked if given.")
@click.option("--micro-batch-size", "--mbs", "micro_batch_size", type=int, required=True,
              callback=_positive, help="Sequences per micro-batch.")
@click.option("--recompute", type=click.Choice(RECOMPUTE_KINDS), default="none", show_default=True)
@click.option("--recompute-modules", default=None,
              help=MODULES_HELP + " [default: core_attn, Megatron's].")
@click.option("--offload-activation-layers", type=click.IntRange(0, 100_000), default=0,
              help="Megatron activation offload (--cpu-offloading-num-layers): layers whose "
                   "activations go to host memory (pp 1, no recompute).")
@click.option("--sequence-parallel/--no-sequence-parallel", default=None,
              help="Megatron sequence parallelism [default: on when tp > 1].")
@click.option("--distributed-optimizer/--no-distributed-optimizer", default=True, show_default=True,
              help="Shard optimizer states over data-parallel ranks (ZeRO-1).")
@click.option("--mem-headroom", type=float, default=DEFAULT_PLAN_HEADROOM, show_default=True,
              callback=finite_range(0.0, 0.5),
              help="Fraction of GPU memory to keep free when judging fit (the same rule as plan).")
@click.option("--cuda-graphs", is_flag=True,
              help="Whole-iteration CUDA graphs (Megatron --cuda-graph-impl full_iteration): "
                   "no per-MoE-layer host cost.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="Pipeline schedule [default: interleaved when vp > 1, else 1f1b]; zb-v and "
                   "dualpipev need --vp 2.")
@sharding_options
@moe_options(a2a_default=False)
def estimate(model, cluster, nodes, gpus_per_node, seq_len, global_batch_size, dtype, cost_model,
             as_json, micro_batch_size, recompute, recompute_modules, offload_activation_layers,
             sequence_parallel,
             distributed_optimizer,
             mem_headroom, etp, expert_imbalance, mtp_layers, cuda_graphs, schedule, fsdp,
             dp_replicate, fsdp_strategy, fsdp_reshard_after_forward, grad_reduce_fp32,
             framework, torch_compile, async_tp, moe_dispatcher,
             moe_a2a_overlap, te_cross_entropy, cuda_graph_modules, **degrees):
    """Predict step time, throughput, MFU and peak memory of one layout."""
    check_sharding(fsdp, dp_replicate, fsdp_strategy, framework,
                   fsdp_reshard_after_forward)
    check_titan(framework, torch_compile, async_tp)
    prob = with_expert_imbalance(resolve_problem(
        model, cluster, nodes, gpus_per_node, seq_len, global_batch_size, dtype, cost_model),
        expert_imbalance, mtp_layers)
    degrees["etp"] = degrees["tp"] if etp is None else etp
    world = prob.cluster.world_size
    one = {**degrees, "dp": 1}
    if world % ParallelDims(**one).world:  # the model's own rules (heads, layers...) say more, if broken
        Layout(**one, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
               seq_len=seq_len, recompute=recompute, dtype=dtype).validate(prob.model)
    dims = ParallelDims.fill(world, **degrees)  # dp derived (and checked)
    layout = Layout(
        **dims.to_dict(), micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size, seq_len=seq_len, recompute=recompute,
        sequence_parallel=dims.tp > 1 if sequence_parallel is None else sequence_parallel,
        distributed_optimizer=distributed_optimizer, dtype=dtype, cuda_graphs=cuda_graphs,
        pipeline_schedule=None if schedule == default_schedule(dims.vp) else schedule,
        fsdp=fsdp, dp_replicate=dp_replicate, fsdp_strategy=fsdp_strategy,
        fsdp_reshard_after_forward=fsdp_reshard_after_forward,
        grad_reduce_fp32=grad_reduce_fp32,
        framework=framework,
        recompute_modules=module_list(recompute_modules) if recompute_modules else (),
        offload_activation_layers=offload_activation_layers, torch_compile=torch_compile,
        async_tp=async_tp, moe_dispatcher=moe_dispatcher, moe_a2a_overlap=moe_a2a_overlap,
        cuda_graph_modules=graph_module_list(cuda_graph_modules),
        te_cross_entropy=te_cross_entropy,
    )
    est = estimate_layout(prob, layout, mem_headroom)
    verdict = memory_verdict(est, mem_headroom, _recompute_options(prob, layout, est,
                                                                   mem_headroom))
    line, band = validation_of(prob.cluster, prob.model.is_moe, est.cost_model)
    if as_json:
        click.echo(to_json({**est.to_dict(), "mem_headroom": mem_headroom,
                            "verdict": verdict.to_dict(), "validation": band}))
    else:
        print_estimate(est, headroom=mem_headroom, verdict=verdict, validation=line)
    if not est.fits:
        hint = verdict.remedy or "try a larger tp/pp or more GPUs"
        click.echo(f"error: layout does not fit: {verdict.line().split(';')[0]}; {hint}", err=True)
        sys.exit(3)


def _recompute_options(prob, layout: Layout, est, headroom: float) -> dict:
    """Estimates of the same layout with heavier recompute, when the fit is missing or tight
    (the verdict names the lightest one that fits)."""
    usable = est.capacity_GiB
    if est.fits and usable - est.peak_GiB >= TIGHT_FRACTION * usable:
        return {}
    heavier = RECOMPUTE_KINDS[RECOMPUTE_KINDS.index(layout.recompute) + 1:]
    return {r: estimate_layout(prob, replace(
        layout, recompute=r, recompute_modules=(), offload_activation_layers=0,
        # the overlap where Megatron still allows it with the heavier recompute
        moe_a2a_overlap=layout.moe_a2a_overlap and a2a_overlap_problem(
            prob.model, layout.framework, layout.ep, layout.pp, layout.vp, r) is None),
        headroom) for r in heavier}
