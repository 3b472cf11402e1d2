"""torchtitan settings for a plan, for the released 0.3.0 (default) or the main branch.

`pip install torchtitan` installs 0.3.0, whose TrainingConfig counts batches in sequences
(`training.local_batch_size`, `global_batch_size`, `seq_len`) and pipeline micro-batches by
size (`parallelism.pipeline_parallel_microbatch_size`). torchtitan's main branch since
2026-08-20 (names checked at pytorch/torchtitan@b5bcd76c) counts tokens
(`training.num_tokens_per_microbatch_per_dp_rank`, `num_tokens_per_train_step`,
`max_context_length`) and micro-batches by number (`parallelism.num_pp_microbatches`).

What both need and what the mapping decides:
- The model: `--module M --config C` of a torchtitan config registry whose model has the
  plan's shape (TITAN_MODELS); a model torchtitan does not ship gets no --module/--config and
  a note (the user registers one).
- An FSDP / HSDP plan (`Layout.fsdp`) -> `data_parallel_shard_degree` dp/dp_replicate and
  `data_parallel_replicate_degree` dp_replicate with the plan's reshard policy
  (`Layout.fsdp_reshard_after_forward`; torchtitan's default reshards after forward unless
  pp), the FSDP2 the estimate modelled.
- Any other plan: dp -> `data_parallel_shard_degree` (FSDP2). torchtitan has no ZeRO-1; sharding with
  `fsdp_reshard_after_forward never` keeps the gathered weights from the forward to the
  backward, so weights are gathered once and gradients reduce-scattered once per micro-batch
  step, the communication the plan's distributed optimizer has. Expert parallelism needs it
  too: the sparse mesh is efsdp x ep with efsdp = dp_shard * cp * tp / ep
  (torchtitan/distributed/parallel_dims.py).
- The pipeline split: `parallelism.module_fqns_per_model_part`, one comma-separated list of
  module names per virtual stage (tok_embeddings, layers.<i>, norm, lm_head), so uneven and
  interleaved splits are exactly the plan's; stage k runs on pp rank k % pp (looped schedules)
  or in a V (ZBVZeroBubble, DualPipeV: stage k and 2p-1-k on rank k).
- Pipelines need `training.disable_cuda_graphs` (Trainer.Config._validate_cuda_graphs:
  "CUDA graphs do not support pipeline parallelism yet"), and so does expert parallelism with
  the default token dispatcher. It precedes the activation-checkpoint subcommand, which tyro
  requires last.
- Batches: pp > 1 runs all the plan's micro-batches in one pipeline pass (local batch =
  gbs / dp sequences split into micro-batches of mbs); pp = 1 accumulates gradients over
  gbs / (mbs * dp) micro-batches of mbs, as Megatron does.
"""

from __future__ import annotations

from planner.planfile import Plan

VERSIONS = ("0.3.0", "main")
DEFAULT_VERSION = "0.3.0"
MAIN_COMMIT = "b5bcd76c66d0acb1a08b176d9639425bc55e0b2a"
SCHEDULES = {"1f1b": "1F1B", "interleaved": "Interleaved1F1B", "zb-v": "ZBVZeroBubble",
             "dualpipev": "DualPipeV"}
"""meshplan schedule -> torch.distributed.pipelining `get_schedule_class` name (what
`parallelism.pipeline_parallel_schedule` takes). The V schedules place stage k on rank k and
stage 2p-1-k on rank k themselves (stage_ids_this_rank style "v"), from the same model-order
`module_fqns_per_model_part`."""
FALLBACK = {"zb-h1": "1F1B", "dualpipe": "1F1B"}
"""Schedules torch.distributed.pipelining has no class for, and what runs instead: ZB-H1's
one-stage-per-rank order without the B/W split (its zero-bubble class, InterleavedZeroBubble,
needs several stages per rank), and DualPipe's two directions (only the V variant exists)."""
DEGREE_SETTINGS = {"tp": "parallelism.tensor_parallel_degree",
                   "pp": "parallelism.pipeline_parallel_degree",
                   "cp": "parallelism.context_parallel_degree",
                   "ep": "parallelism.expert_parallel_degree"}
"""ParallelDims degree -> torchtitan setting (dp is the FSDP shard degree, below)."""
# meshplan preset -> (torchtitan module, config registry function) building the same model.
TITAN_MODELS = {
    "llama3.1-8b": ("llama3", "llama3_8b"),
    "llama3.1-70b": ("llama3", "llama3_70b"),
    "llama3.1-405b": ("llama3", "llama3_405b"),
    "deepseek-v3": ("deepseek_v3", "deepseek_v3_671b"),
}


def titan_model(plan: Plan) -> tuple[str, str] | None:
    """(--module, --config) of the torchtitan model that is the plan's model, if shipped."""
    return TITAN_MODELS.get(plan.model.name)


def model_parts(plan: Plan) -> list[list[str]]:
    """Module FQNs per model chunk (torchtitan `module_fqns_per_model_part`), names of
    torchtitan's Decoder (models/common/decoder.py): tok_embeddings, layers.<i>, norm, lm_head."""
    parts = [[f"layers.{i}" for i in range(s.first_layer, s.last_layer)] for s in plan.stages]
    parts[0].insert(0, "tok_embeddings")
    parts[-1] += ["norm", "lm_head"]
    return parts


def _batch_settings(plan: Plan, version: str) -> dict[str, object]:
    lay = plan.layout
    if version == "main":
        out: dict[str, object] = {
            "training.max_context_length": lay.seq_len,
            "training.num_tokens_per_microbatch_per_dp_rank": lay.micro_batch_size * lay.seq_len,
            "training.num_tokens_per_train_step": lay.global_batch_size * lay.seq_len,
        }
        if lay.pp > 1:
            out["parallelism.num_pp_microbatches"] = lay.num_microbatches
        return out
    local = lay.global_batch_size // lay.dp if lay.pp > 1 else lay.micro_batch_size
    out = {"training.local_batch_size": local, "training.global_batch_size": lay.global_batch_size,
           "training.seq_len": lay.seq_len}
    if lay.pp > 1:
        out["parallelism.pipeline_parallel_microbatch_size"] = lay.micro_batch_size
    return out


def settings(plan: Plan, version: str = DEFAULT_VERSION) -> dict[str, object]:
    """torchtitan `section.field` -> value for the plan (without the pipeline split)."""
    lay = plan.layout
    dims = lay.dims
    out: dict[str, object] = {key: dims.size(name) for name, key in DEGREE_SETTINGS.items()}
    if lay.fsdp:
        out |= {
            "parallelism.data_parallel_shard_degree": dims.dp_shard,
            "parallelism.data_parallel_replicate_degree": dims.dp_replicate,
            "parallelism.fsdp_reshard_after_forward": lay.fsdp_reshard_after_forward,
        }
    else:
        out |= {
            "parallelism.data_parallel_shard_degree": lay.dp,
            "parallelism.data_parallel_replicate_degree": 1,
            "parallelism.fsdp_reshard_after_forward": "never",
        }
    if lay.tp > 1:
        out["parallelism.enable_sequence_parallel"] = lay.sequence_parallel
    if lay.pp > 1:
        out["parallelism.pipeline_parallel_schedule"] = SCHEDULES.get(lay.schedule) \
            or FALLBACK[lay.schedule]
    out.update(_batch_settings(plan, version))
    # what the estimate priced: eager kernels, or fused ones under compile (and async TP);
    # set both ways, since some torchtitan model configs enable compile by default
    out["compile.enable"] = lay.torch_compile
    if lay.torch_compile:
        out["compile.enable_async_tensor_parallel"] = lay.async_tp
    if lay.pp > 1 or lay.ep > 1:
        out["training.disable_cuda_graphs"] = True
    return out


def args(plan: Plan, version: str = DEFAULT_VERSION) -> list[str]:
    """Command-line overrides: --module/--config when torchtitan ships the model, the
    settings (tyro bool flags as --x / --section.no-x), the stage split, and the
    activation-checkpoint subcommand last."""
    out: list[str] = []
    model = titan_model(plan)
    if model is not None:
        out += ["--module", model[0], "--config", model[1]]
    for key, value in settings(plan, version).items():
        if isinstance(value, bool):
            section, field = key.split(".", 1)
            out.append(f"--{key}" if value else f"--{section}.no-{field}")
        else:
            out += [f"--{key}", str(value)]
    if plan.layout.pp > 1:
        out += ["--parallelism.module_fqns_per_model_part",
                *(",".join(part) for part in model_parts(plan))]
    return out + [f"activation-checkpoint:{plan.layout.recompute}"]


def config_py(plan: Plan, version: str = DEFAULT_VERSION) -> str:
    """A Python module with `apply_meshplan(config)`, setting the plan's layout on a
    torchtitan Trainer.Config (the way torchtitan recipes are written), incl. the split."""
    lines = [
        f'"""meshplan layout for torchtitan {version}: call apply_meshplan(config) in your recipe."""',
        "",
        "",
        "def apply_meshplan(config):",
        '    """Set parallelism, batch, stage split and activation checkpointing from the plan."""',
    ]
    for key, value in settings(plan, version).items():
        lines.append(f"    config.{key} = {value!r}")
    if plan.layout.pp > 1:
        lines.append(f"    config.parallelism.module_fqns_per_model_part = {model_parts(plan)!r}")
    kind = {"none": None, "full": "FullAC", "selective": "SelectiveAC"}[plan.layout.recompute]
    if kind is None:
        lines.append("    config.activation_checkpoint = None")
    else:
        lines.append(f"    from torchtitan.distributed.activation_checkpoint import {kind}")
        lines.append(f"    config.activation_checkpoint = {kind}.Config()")
    lines.append("    return config")
    return "\n".join(lines) + "\n"


def notes(plan: Plan, version: str = DEFAULT_VERSION) -> list[str]:
    """What torchtitan will run differently from the plan (one line each, for stderr)."""
    lay, out = plan.layout, []
    if titan_model(plan) is None:
        out.append(f"torchtitan {version} ships no {plan.model.name} model: torchtitan_args.sh "
                   "has the layout only; add --module/--config of a model you registered")
    if plan.model.mtp_layers:
        out.append(f"torchtitan {version} has no multi-token prediction: the model's "
                   f"{plan.model.mtp_layers} MTP module(s) are not trained"
                   + ("" if lay.framework == "torchtitan" else
                      "; the estimate (Megatron conventions) counted them on the last stage"))
    if lay.fsdp and lay.fsdp_strategy == "optim_grads":
        out.append("torchtitan's FSDP2 has no ZeRO-2: the settings shard the parameters too "
                   "(per-block gathers the ZeRO-2 estimate did not price); plan without "
                   "--fsdp-strategy optim_grads for torchtitan")
    if lay.dp > 1 and not lay.distributed_optimizer and not lay.fsdp:
        out.append("torchtitan shards dp with FSDP2 (no plain DDP with expert/fsdp meshes here); "
                   "the plan modelled replicated optimizer state, so memory will be lower")
    if lay.ep > 1 and lay.etp != 1:
        out.append(f"torchtitan {version} has no expert tensor parallelism (experts stay whole: "
                   "efsdp = dp_shard*cp*tp/ep); the plan's etp="
                   f"{lay.etp} splits each expert, so expert memory will be higher — plan with "
                   "--etp 1 for torchtitan")
    if lay.pp > 1 and lay.schedule in FALLBACK:
        out.append(f"torchtitan (torch.distributed.pipelining) has no {lay.schedule} schedule; "
                   f"the settings run {FALLBACK[lay.schedule]}, whose bubble is larger than "
                   "planned: re-plan with --schedule zb-v or dualpipev (torchtitan runs both)")
    if lay.framework != "torchtitan":
        out.append("the estimate used Megatron memory conventions (selective = attention core, "
                   "fused loss); re-estimate with --framework torchtitan for torchtitan's "
                   "per-op SAC and fp32 loss buffers")
    if lay.dtype == "fp8":
        out.append("torchtitan fp8 needs a float8 model converter in the recipe "
                   "(e.g. llama3_8b's *_float8 configs); the arguments keep bf16 unless you add it")
    if lay.dtype == "mxfp8":
        out.append("torchtitan mxfp8 needs the MX converter in the recipe "
                   "(torchtitan.components.quantization.mx.MXFP8LinearConverter, torchao, SM100+, "
                   "torch.compile); the arguments keep bf16 unless you add it")
    if (lay.tp > 1 and plan.cluster.gpu.tp_comm_overlap > 0 and lay.sequence_parallel
            and lay.framework != "torchtitan"):
        out.append("torchtitan overlaps TP communication only with async TP under torch.compile "
                   "(--compile.enable --compile.enable_async_tensor_parallel); without it the "
                   "TP communication the estimate hid is exposed")
    return out
