"""Click options shared by `plan` and `estimate`, and the model/cluster they resolve to."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import click

from cost_models.specs import (
    CUDA_GRAPH_MODULES,
    DTYPES,
    FRAMEWORKS,
    FSDP_STRATEGIES,
    MOE_DISPATCHERS,
    RESHARD_POLICIES,
    ClusterSpec,
    ModelSpec,
    SpecError,
    fsdp_option_problem,
)

from .cli import one_line
from .specfiles import load_cluster, load_model

COST_MODELS = ("auto", "megatron", "pipette", "holmes")


DEFAULT_PLAN_HEADROOM = 0.05
"""Fraction of GPU memory `plan` and `estimate` keep free when judging fit (prediction error,
allocator spikes); one rule for both commands, printed by both."""

MAX_OPTION_INT = 100_000_000
"""Largest integer any size option takes (--nodes, --seq-len, degrees...); larger is a typo."""


def _positive(ctx: click.Context, param: click.Parameter, value):
    """Click callback: a positive integer no larger than MAX_OPTION_INT (None passes)."""
    if value is not None and not 0 < value <= MAX_OPTION_INT:
        shown = f"{value}" if abs(value) < 10**12 else f"{str(value)[:12]}... ({len(str(value))} digits)"
        raise click.BadParameter(f"must be an integer in 1..{MAX_OPTION_INT:,}, got {shown}")
    return value


def finite_range(low: float, high: float):
    """Click callback factory: a finite float in [low, high] (click's FloatRange lets NaN by)."""
    def check(ctx: click.Context, param: click.Parameter, value):
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise click.BadParameter(f"must be a finite number in [{low:g}, {high:g}], got {value}")
        return value
    return check


def problem_options(func):
    """--model --cluster --nodes --gpus-per-node --seq-len --global-batch-size --dtype --cost-model."""
    opts = [
        click.option("--model", "-m", "model", required=True,
                     help="Model preset (meshplan models) or path to a HuggingFace config.json."),
        click.option("--cluster", "-c", "cluster", required=True,
                     help="Cluster preset (meshplan clusters) or path to a cluster.yaml."),
        click.option("--nodes", type=int, callback=_positive, help="Nodes for a cluster preset."),
        click.option("--gpus-per-node", type=int, callback=_positive,
                     help="GPUs (processes) per node, where the preset allows (e.g. local-cpu)."),
        click.option("--seq-len", type=int, required=True, callback=_positive,
                     help="Tokens per sequence."),
        click.option("--global-batch-size", "--gbs", "global_batch_size", type=int, required=True,
                     callback=_positive, help="Sequences per optimizer step."),
        click.option("--dtype", type=click.Choice(DTYPES), default="bf16", show_default=True,
                     help="Matmul dtype (MFU is against this dtype's dense peak)."),
        click.option("--cost-model", type=click.Choice(COST_MODELS), default="auto",
                     show_default=True, help="auto picks from what the cluster spec holds."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(opts), func)


def sharding_options(func):
    """--fsdp --dp-replicate --grad-reduce-in-fp32/--no-grad-reduce-in-fp32 --framework
    --torch-compile --async-tp (plan, estimate)."""
    opts = [
        click.option("--fsdp", is_flag=True,
                     help="Fully sharded data parallelism (ZeRO-3, torchtitan FSDP2): params, "
                          "grads and optimizer sharded over dp/dp-replicate x cp ranks."),
        click.option("--dp-replicate", type=int, default=1, show_default=True,
                     callback=_positive,
                     help="HSDP: replicate over this many groups, shard within each (needs --fsdp)."),
        click.option("--fsdp-strategy", type=click.Choice(FSDP_STRATEGIES),
                     default="optim_grads_params", show_default=True,
                     help="Megatron-FSDP --data-parallel-sharding-strategy with --fsdp: "
                          "optim_grads_params (ZeRO-3) or optim_grads (ZeRO-2: parameters "
                          "whole on every rank, no per-layer gather)."),
        click.option("--fsdp-reshard-after-forward", type=click.Choice(RESHARD_POLICIES),
                     default="default", show_default=True,
                     help="torchtitan FSDP2 with --fsdp: default (reshard unless pp), always, "
                          "or never (keep the gathered blocks until their backward)."),
        click.option("--grad-reduce-in-fp32/--no-grad-reduce-in-fp32", "grad_reduce_fp32",
                     default=True, show_default=True,
                     help="fp32 main gradients (Megatron-LM and torchtitan default); off: bf16 "
                          "grad buffers (Megatron-Bridge perf recipes)."),
        click.option("--framework", type=click.Choice(FRAMEWORKS), default="megatron",
                     show_default=True,
                     help="Whose memory conventions: selective recompute (megatron: attention "
                          "core; torchtitan: per-op SAC), loss buffers, FSDP states."),
        click.option("--torch-compile", is_flag=True,
                     help="torchtitan: torch.compile the model (fused elementwise kernels; "
                          "launch writes --compile.enable). Eager without it."),
        click.option("--async-tp", is_flag=True,
                     help="torchtitan: async tensor parallelism (needs --torch-compile); "
                          "without it torchtitan's TP communication is not overlapped."),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(opts), func)


def check_sharding(fsdp: bool, dp_replicate: int, fsdp_strategy: str = "optim_grads_params",
                   framework: str = "megatron", reshard: str = "default") -> None:
    """The one-line errors for --dp-replicate, --fsdp-strategy or --fsdp-reshard-after-forward
    without --fsdp (and the strategy off Megatron, the reshard policy off torchtitan)."""
    if dp_replicate > 1 and not fsdp:
        raise click.BadParameter("--dp-replicate > 1 is HSDP and needs --fsdp; add --fsdp",
                                 param_hint="--dp-replicate")
    problem = fsdp_option_problem(fsdp, framework, fsdp_strategy, reshard)
    if problem:
        raise click.BadParameter(problem[1], param_hint=problem[0])


def check_titan(framework: str, torch_compile: bool, async_tp: bool) -> None:
    """One-line errors for torchtitan-only options given without torchtitan / compile."""
    if (torch_compile or async_tp) and framework != "torchtitan":
        raise click.BadParameter("--torch-compile and --async-tp model torchtitan; add "
                                 "--framework torchtitan", param_hint="--framework")
    if async_tp and not torch_compile:
        raise click.BadParameter("async TP runs under torch.compile; add --torch-compile",
                                 param_hint="--async-tp")


@dataclass(frozen=True, slots=True)
class Problem:
    model: ModelSpec
    cluster: ClusterSpec
    seq_len: int
    global_batch_size: int
    dtype: str
    cost_model: str


def resolve_problem(model: str, cluster: str, nodes: int | None, gpus_per_node: int | None,
                    seq_len: int, global_batch_size: int, dtype: str, cost_model: str) -> Problem:
    spec = load_model(model)
    clus = load_cluster(cluster, nodes, gpus_per_node)
    for gpu in {n.gpu for n in clus.nodes}:
        if dtype not in clus.gpu_types[gpu].peak_tflops:
            raise SpecError(
                f"GPU {gpu} has no {dtype} support (has {sorted(clus.gpu_types[gpu].peak_tflops)}); "
                "use --dtype bf16"
            )
    if seq_len > spec.max_seq_len:
        click.echo(one_line(
            f"warning: --seq-len {seq_len} is beyond {spec.name}'s max_position_embeddings "
            f"({spec.max_seq_len}); planning it anyway, but the model needs position scaling "
            "or long-context training to use it"), err=True)
    return Problem(spec, clus, seq_len, global_batch_size, dtype, cost_model)


DEFAULT_EXPERT_IMBALANCE = 1.1
"""Busiest expert's tokens over the mean that plan and estimate assume for MoE models: routers
trained with a load-balancing loss (or DeepSeek-V3's bias-based balancing) keep the per-batch
maximum near the mean, but not at it; 1.0 is only reached by force-balanced benchmarks
(docs/models.md). An assumption, not a fit: set --expert-imbalance from your own runs."""


def expert_imbalance_option(func):
    """--expert-imbalance (the MoE router's load imbalance) and --mtp-layers (multi-token
    prediction modules): what the model is trained with beyond its shape (plan and estimate)."""
    func = click.option(
        "--mtp-layers", type=click.IntRange(0, 16), default=None,
        help="Multi-token prediction modules trained on the last stage (DeepSeek-V3: 1) "
             "[default: the config's num_nextn_predict_layers]; 0: train without them.")(func)
    return click.option(
        "--expert-imbalance", type=float, default=DEFAULT_EXPERT_IMBALANCE, show_default=True,
        callback=finite_range(1.0, 100.0),
        help="MoE: tokens of the busiest expert over the mean (1.0: force-balanced).")(func)


def with_expert_imbalance(prob: Problem, imbalance: float, mtp_layers: int | None = None
                          ) -> Problem:
    """The problem with the model's router imbalance (MoE models only) and, when given, its
    multi-token prediction modules set."""
    model = prob.model
    if model.is_moe:
        model = replace(model, expert_load_imbalance=imbalance)
    if mtp_layers is not None:
        model = replace(model, mtp_layers=mtp_layers)
    return replace(prob, model=model)



MODULES_HELP = ("Megatron modules recomputed with --recompute selective, comma-separated: "
                "core_attn, layernorm, mlp, moe_act, moe, shared_experts, mla_up_proj")


def module_list(text: str, option: str = "--recompute-modules") -> tuple[str, ...]:
    """'layernorm,mlp' -> ('layernorm', 'mlp'); SpecError naming the option on an empty item
    (names are checked against the model by `Layout.validate` / `recompute_modules.check`)."""
    names = tuple(w.strip() for w in text.split(","))
    if not all(names) or len(text) > 500:
        raise SpecError(f"{option} {text[:80]!r}: write a comma-separated list such as "
                        "layernorm,mlp")
    return names


def moe_options(a2a_default: bool):
    """--moe-dispatcher --moe-a2a-overlap/--no-moe-a2a-overlap --te-cross-entropy
    --cuda-graph-modules (Megatron-Core runtime switches of plan and estimate; plan turns the overlap on where Megatron allows it, estimate off unless asked)."""
    where = " where Megatron allows it (ep > 1, vp > 1 with pp > 1, no full recompute)" \
        if a2a_default else ""
    opts = [
        click.option("--moe-dispatcher", type=click.Choice(MOE_DISPATCHERS), default="alltoall",
                     show_default=True,
                     help="MoE token dispatcher: Megatron's alltoall, or the flex dispatcher's "
                          "deepep / hybridep backend (one copy per remote node, NVLink "
                          "forwarding)."),
        click.option("--moe-a2a-overlap/--no-moe-a2a-overlap", default=a2a_default,
                     show_default=True,
                     help="MoE: Megatron --overlap-moe-expert-parallel-comm (expert all-to-all "
                          f"under another micro-batch's compute){where}."),
        click.option("--te-cross-entropy", is_flag=True,
                     help="Megatron: Transformer Engine's fused cross entropy (what "
                          "Megatron-Bridge's perf recipes run; 2 bytes per logit, launched by "
                          "the Bridge override only: Megatron-LM rejects it)."),
        click.option("--cuda-graph-modules", default=None,
                     help="Megatron per-module CUDA graphs (--cuda-graph-impl "
                          "transformer_engine), comma-separated: "
                          f"{', '.join(CUDA_GRAPH_MODULES)}."),
    ]
    return lambda func: functools.reduce(lambda f, opt: opt(f), reversed(opts), func)


def graph_module_list(text: str | None) -> tuple[str, ...]:
    """--cuda-graph-modules 'attn,moe_router' -> ('attn', 'moe_router'); SpecError naming a
    module Megatron does not have."""
    if not text:
        return ()
    names = module_list(text, "--cuda-graph-modules")
    bad = [n for n in names if n not in CUDA_GRAPH_MODULES]
    if bad:
        raise SpecError(f"--cuda-graph-modules: unknown module {bad[0][:40]!r}; Megatron "
                        f"captures {', '.join(CUDA_GRAPH_MODULES)}")
    return names
