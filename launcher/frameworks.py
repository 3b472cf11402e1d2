"""A plan's layout as framework arguments: Megatron-LM flags and torchtitan settings.

Names are the real ones of those projects; tests/test_launch.py checks every flag we emit
against lists taken from their sources (tests/data/framework_args_*.txt name the commits):
- Megatron-LM: megatron/training/arguments.py (argparse flags, many generated from the
  TransformerConfig / ModelParallelConfig dataclasses).
- torchtitan: torchtitan/config/configs.py (ParallelismConfig, TrainingConfig) selected on
  the command line as `--section.field`, activation checkpointing as the tyro subcommand
  `activation-checkpoint:{selective,full,none}` (torchtitan/distributed/activation_checkpoint.py);
  pipeline schedule names from torch.distributed.pipelining.schedules.get_schedule_class.
"""

from __future__ import annotations

from planner.planfile import Plan

from .megatron import megatron_args, megatron_env, megatron_notes, megatron_pipeline_args

__all__ = ["megatron_args", "megatron_env", "megatron_notes", "megatron_pipeline_args"]

TITAN_SCHEDULES = {"1f1b": "1F1B", "interleaved": "Interleaved1F1B"}


def _flag(name: str, value: object) -> list[str]:
    return [f"--{name}", str(value)]


def torchtitan_settings(plan: Plan) -> dict[str, object]:
    """torchtitan `section.field` -> value for the plan's layout.

    dp maps to FSDP sharding (data_parallel_shard_degree) when the plan shards the optimizer,
    else to plain replication (data_parallel_replicate_degree). torchtitan counts batches in
    tokens: per micro-batch per dp rank = mbs * seq_len, per step = gbs * seq_len.
    """
    lay = plan.layout
    shard = lay.distributed_optimizer
    out: dict[str, object] = {
        "parallelism.tensor_parallel_degree": lay.tp,
        "parallelism.pipeline_parallel_degree": lay.pp,
        "parallelism.context_parallel_degree": lay.cp,
        "parallelism.expert_parallel_degree": lay.ep,
        "parallelism.data_parallel_shard_degree": lay.dp if shard else 1,
        "parallelism.data_parallel_replicate_degree": 1 if shard else lay.dp,
        "training.max_context_length": lay.seq_len,
        "training.num_tokens_per_microbatch_per_dp_rank": lay.micro_batch_size * lay.seq_len,
        "training.num_tokens_per_train_step": lay.global_batch_size * lay.seq_len,
    }
    if lay.tp > 1:
        out["parallelism.enable_sequence_parallel"] = lay.sequence_parallel
    if lay.pp > 1:
        out["parallelism.pipeline_parallel_schedule"] = TITAN_SCHEDULES[lay.schedule]
        out["parallelism.num_pp_microbatches"] = lay.num_microbatches
        sizes = {s.num_layers for s in plan.stages}
        if len(sizes) == 1:
            out["parallelism.pipeline_parallel_layers_per_stage"] = sizes.pop()
    return out


def torchtitan_args(plan: Plan) -> list[str]:
    """torchtitan command-line overrides (`--section.field value`, tyro bool flags, and the
    activation-checkpoint subcommand last)."""
    args: list[str] = []
    for key, value in torchtitan_settings(plan).items():
        if isinstance(value, bool):
            section, field = key.split(".", 1)
            args.append(f"--{key}" if value else f"--{section}.no-{field}")
        else:
            args += [f"--{key}", str(value)]
    return args + [f"activation-checkpoint:{plan.layout.recompute}"]


def torchtitan_model_parts(plan: Plan) -> list[list[str]]:
    """Module FQNs per model chunk (torchtitan `module_fqns_per_model_part`), for the llama-style
    module names tok_embeddings, layers.<i>, norm, output."""
    parts = [[f"layers.{i}" for i in range(s.first_layer, s.last_layer)] for s in plan.stages]
    parts[0].insert(0, "tok_embeddings")
    parts[-1] += ["norm", "output"]
    return parts


def torchtitan_config_py(plan: Plan) -> str:
    """A Python module with `apply_meshplan(config)`, setting the plan's layout on a
    torchtitan Trainer.Config (the way torchtitan recipes are written), incl. uneven stages."""
    lines = [
        '"""meshplan layout for torchtitan: call apply_meshplan(config) in your recipe."""',
        "",
        "",
        "def apply_meshplan(config):",
        '    """Set parallelism, batch and activation checkpointing from the meshplan plan."""',
    ]
    for key, value in torchtitan_settings(plan).items():
        lines.append(f"    config.{key} = {value!r}")
    if plan.layout.pp > 1:
        lines.append(f"    config.parallelism.module_fqns_per_model_part = {torchtitan_model_parts(plan)!r}")
    kind = {"none": None, "full": "FullAC", "selective": "SelectiveAC"}[plan.layout.recompute]
    if kind is None:
        lines.append("    config.activation_checkpoint = None")
    else:
        lines.append(f"    from torchtitan.distributed.activation_checkpoint import {kind}")
        lines.append(f"    config.activation_checkpoint = {kind}.Config()")
    lines.append("    return config")
    return "\n".join(lines) + "\n"
