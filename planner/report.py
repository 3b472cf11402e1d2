"""Human-readable output: estimate breakdowns and ranked plan tables (rich)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.table import Table

from cost_models.specs import Estimate, Layout


def layout_label(lay: Layout) -> str:
    """Compact layout description, e.g. 'tp4 pp4 cp2 dp2 vp5 mbs1 sel sp'."""
    parts = lay.dims.label_parts()
    parts.append(f"mbs{lay.micro_batch_size}")
    if lay.recompute != "none":
        label = {"selective": "rc-sel", "full": "rc-full"}[lay.recompute]
        if lay.recompute_modules:  # Megatron's modules, e.g. rc-sel(layernorm+mlp)
            label += "(" + "+".join(lay.recompute_modules) + ")"
        parts.append(label)
    if lay.offload_activation_layers:
        parts.append(f"offload{lay.offload_activation_layers}")
    if lay.sequence_parallel:
        parts.append("sp")
    if lay.fsdp:
        parts.append(f"hsdp{lay.dp_replicate}" if lay.dp_replicate > 1 else "fsdp")
        if lay.fsdp_strategy == "optim_grads":
            parts.append("zero2")
        if lay.fsdp_reshard_after_forward != "default":
            parts.append(f"reshard-{lay.fsdp_reshard_after_forward}")
    elif not lay.distributed_optimizer:
        parts.append("no-dopt")
    if lay.pipeline_schedule is not None:  # the vp's default (1f1b / interleaved) goes unsaid
        parts.append(lay.pipeline_schedule)
    if not lay.grad_reduce_fp32:
        parts.append("bf16-grads")
    if lay.moe_a2a_overlap:
        parts.append("a2a-overlap")
    if lay.moe_dispatcher != "alltoall":
        parts.append(lay.moe_dispatcher)
    if lay.cuda_graphs or lay.cuda_graph_modules:
        parts.append("graphs" if lay.cuda_graphs else "graphs(" + "+".join(lay.cuda_graph_modules) + ")")
    return " ".join(parts)


def breakdown_table(est: Estimate) -> Table:
    t = Table(title="Step time breakdown (critical path)", show_edge=False)
    t.add_column("part")
    t.add_column("seconds", justify="right")
    t.add_column("share", justify="right")
    total = est.step_time_s
    for name, value in est.time.to_dict().items():
        t.add_row(name.removesuffix("_s").replace("_", " "), f"{value:.4f}", f"{100 * value / total:.1f}%")
    t.add_row("[b]step[/b]", f"[b]{total:.4f}[/b]", "100%")
    return t


def memory_labels(lay: Layout) -> dict[str, str]:
    """Row names of the memory table: what each term holds under the layout's sharding."""
    grad = "fp32" if lay.grad_reduce_fp32 else "bf16"
    if not lay.fsdp:
        opt = f"optimizer (sharded /{lay.dp * lay.cp})" if lay.distributed_optimizer else "optimizer"
        return {"grads": f"grads ({grad})", "optimizer": opt}
    shard = lay.dims.group("dp_shard").size
    policy = lay.fsdp_reshard_after_forward
    keep = policy == "never" or (lay.pp > 1 and policy != "always")
    held = ("stage's blocks (no reshard after forward)" if keep else "2 blocks (prefetch)")
    inflight = f"unsharded in flight ({held} + 1 block's grads + LM head)"
    if lay.framework == "torchtitan":  # FSDP2: the fp32 shard is the master copy
        return {"weights": f"weights (FSDP2 fp32 shard /{shard})",
                "grads": f"grads (fp32 shard /{shard})",
                "optimizer": f"optimizer (Adam m, v shard /{shard})", "unsharded_inflight": inflight}
    param = lay.dtype if lay.dtype in ("fp8", "mxfp8") else "bf16"
    if lay.fsdp_strategy == "optim_grads":  # ZeRO-2: nothing gathered, parameters whole
        return {"weights": f"weights (Megatron-FSDP ZeRO-2: {param}, whole)",
                "grads": f"grads ({grad} shard /{shard})",
                "optimizer": f"optimizer (fp32 master + Adam shard /{shard})",
                "unsharded_inflight": "unsharded in flight (1 block's grads)"}
    return {"weights": f"weights (Megatron-FSDP {param} shard /{shard})",
            "grads": f"grads ({grad} shard /{shard})",
            "optimizer": f"optimizer (fp32 master + Adam shard /{shard})",
            "unsharded_inflight": inflight}


def memory_table(est: Estimate) -> Table:
    t = Table(title="Peak memory per GPU (most loaded rank)", show_edge=False)
    t.add_column("part")
    t.add_column("GiB", justify="right")
    labels = memory_labels(est.layout)
    for name, value in est.memory.to_dict().items():
        label = name.removesuffix("_GiB")
        if label == "unsharded_inflight" and not est.layout.fsdp:
            continue
        label = labels.get(label, label)
        t.add_row(f"[b]{label}[/b]" if label == "peak" else label, f"{value:.2f}")
    t.add_row("capacity", f"{est.capacity_GiB:.2f}")
    return t


PIPE_WIDTH = 160
"""Columns of text written to a pipe or file (rich would wrap at 80 and split layout names)."""


def cli_console(stderr: bool = False) -> Console:
    """A rich Console for command output: the terminal's width on a terminal, PIPE_WIDTH
    columns when piped (set COLUMNS to choose another)."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=PIPE_WIDTH if piped else None)


def print_estimate(est: Estimate, console: Console | None = None, headroom: float = 0.0,
                   verdict=None, validation: str | None = None) -> None:
    """The human-readable `estimate` report, ending with the memory verdict (planner.verdict;
    `headroom` is the fraction of memory kept free that `est.capacity_GiB` already excludes;
    `validation`: how close such predictions came to published runs, planner.validation)."""
    from .verdict import memory_verdict

    console = console or cli_console()
    lay = est.layout
    console.print(
        f"[b]{layout_label(lay)}[/b]  world {lay.world}, {lay.num_microbatches} micro-batches, "
        f"schedule {lay.schedule}, {lay.dtype}, cost model {est.cost_model}"
    )
    console.print(
        f"step {est.step_time_s:.3f} s   {est.tokens_per_s:,.0f} tokens/s   "
        f"MFU {100 * est.mfu:.1f}%   {est.tflops_per_gpu:.0f} model TFLOP/s per GPU"
    )
    console.print("[dim]MFU = model FLOPs (causal attention, no recompute) / dense "
                  f"{lay.dtype} peak[/dim]")
    if validation:
        console.print(validation, highlight=False, soft_wrap=True)
    console.print(breakdown_table(est))
    console.print(memory_table(est))
    verdict = verdict or memory_verdict(est, headroom)
    colour = "red" if not verdict.fits else "yellow" if verdict.tight else "green"
    word, _, rest = verdict.line().partition(":")
    console.print(f"[{colour}]{word}[/{colour}]:{rest}", highlight=False)
