"""Feed meshplan's Megatron-LM arguments to Megatron-LM itself and compare with the plan.

    python benchmarks/check_megatron_args.py --megatron-src DIR PLAN.yaml [PLAN.yaml ...] [--json]

DIR is a checkout of NVIDIA/Megatron-LM (its `megatron/` package is imported from there; the
commit is read from DIR/.git or given with --commit). For each plan, as rank 0 of the plan's
world on the plan's GPU generation:

1. the environment `launch` writes (launcher.megatron.megatron_env) is set, and Megatron's
   `get_device_arch_version` answers the plan GPU's compute capability (no GPU here);
2. `megatron.training.arguments.parse_args` parses `pretrain_gpt.py` + MEGATRON_ARGS + the
   data/tokenizer/schedule arguments a user adds (mock data, NullTokenizer, train iters, lr);
3. `validate_args` and `core_transformer_config_from_args` run unchanged;
4. the resulting TransformerConfig and args are compared with the plan: model shape,
   architecture (rope, base, scaling, norm, biases, activation, GQA, qk-norm, dropout, MLA,
   MoE dispatcher and grouped GEMM), layout, overlaps, precision, and the layers each
   (pipeline rank, virtual stage) builds (Megatron's get_num_layers_to_build and
   get_transformer_layer_offset) against the plan's stages.

The GPU node is simulated where Megatron asks the hardware: its compute capability (the
plan's GPU) and Transformer Engine's fused rotary kernel being importable. Modules of
Megatron that import triton (GPU kernels, never run here) are replaced by empty
stand-ins, and on Python < 3.12 `typing.override` (a no-op decorator) is provided. Exit status
1 if any plan is rejected or differs, with one line per difference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.architecture import architecture, transformer_config_fields  # noqa: E402
from launcher.megatron import (  # noqa: E402
    FP8_RECIPE,
    cuda_arch_major,
    megatron_args,
    megatron_env,
    tp_overlap_assumed,
)
from planner.planfile import read_plan  # noqa: E402

_TRITON_IMPORT = re.compile(r"^(import triton|from triton)", re.M)


def _stub_triton_modules(src: Path) -> None:
    """Empty stand-ins for Megatron modules that import triton at import time."""
    import importlib.abc
    import importlib.machinery
    import types

    names = set()
    for path in (src / "megatron").rglob("*.py"):
        if _TRITON_IMPORT.search(path.read_text(errors="replace")):
            mod = ".".join(path.relative_to(src).with_suffix("").parts)
            names.add(mod.removesuffix(".__init__"))

    class _Anything(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Anything(name, (), {})

        def __call__(cls, *args, **kwargs):
            return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else cls

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Anything(name, (), {})

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            return importlib.machinery.ModuleSpec(name, self) if name in names else None

        def create_module(self, spec):
            return _Module(spec.name)

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


def _import_megatron(src: Path):
    if not hasattr(typing, "override"):
        typing.override = lambda func: func  # Python 3.12's no-op marker
    _stub_triton_modules(src)
    sys.path.insert(0, str(src))
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    from megatron.training import argument_utils, arguments

    return arguments, argument_utils, get_num_layers_to_build, get_transformer_layer_offset


def _simulate_gpu_node(arguments, arch: int) -> None:
    """What a GPU node with Transformer Engine answers: the compute capability, and TE's
    fused rotary kernel being present (TransformerConfig checks both; neither exists here)."""
    import torch
    from megatron.core.models.common.embeddings import rope_utils

    arguments.get_device_arch_version = lambda: arch
    torch.cuda.get_device_capability = lambda device=None: (arch, 0)
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = lambda *args, **kwargs: None


def _user_args(plan) -> list[str]:
    """What a user adds to MEGATRON_ARGS: data, tokenizer, schedule length, learning rate."""
    return ["--mock-data", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(plan.model.vocab_size), "--train-iters", "10", "--lr", "1e-4"]


def _run_megatron(mega, plan, with_env: bool = True):
    arguments, argument_utils, _, _ = mega
    for key in ("CUDA_DEVICE_MAX_CONNECTIONS", "NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN"):
        os.environ.pop(key, None)
    os.environ.update(megatron_env(plan) if with_env else {}, WORLD_SIZE=str(plan.layout.world), RANK="0",
                      LOCAL_RANK="0")
    _simulate_gpu_node(arguments, cuda_arch_major(plan) or 9)
    script = "pretrain_hybrid.py" if plan.model.layer_pattern else "pretrain_gpt.py"
    sys.argv = [script, *megatron_args(plan), *_user_args(plan)]
    args = arguments.parse_args()
    arguments.validate_args(args)
    config_class = None
    if args.multi_latent_attention:
        from megatron.core.transformer.transformer_config import MLATransformerConfig
        config_class = MLATransformerConfig
    return args, argument_utils.core_transformer_config_from_args(args, config_class)


def _expected(plan) -> dict:
    m, lay = plan.model, plan.layout
    arch, _ = architecture(m)
    exp = {
        "num_layers": m.num_layers, "hidden_size": m.hidden_size,
        "ffn_hidden_size": m.ffn_hidden_size, "num_attention_heads": m.num_heads,
        "tensor_model_parallel_size": lay.tp, "pipeline_model_parallel_size": lay.pp,
        "context_parallel_size": lay.cp, "expert_model_parallel_size": lay.ep,
        "virtual_pipeline_model_parallel_size": lay.vp if lay.vp > 1 else None,
        "sequence_parallel": lay.sequence_parallel and lay.tp > 1,
        **transformer_config_fields(m, arch),
        "tp_comm_overlap": tp_overlap_assumed(plan),
        "fp8": "hybrid" if lay.dtype == "fp8" else None, "bf16": True,
        "recompute_granularity": None if lay.recompute == "none" else lay.recompute,
    }
    if lay.recompute == "selective":
        exp["recompute_modules"] = list(lay.recompute_modules or ("core_attn",))
    exp["cpu_offloading"] = lay.offload_activation_layers > 0
    if lay.offload_activation_layers:
        exp["cpu_offloading_num_layers"] = lay.offload_activation_layers
    if arch.mla is None:
        exp["num_query_groups"] = m.num_kv_heads
        exp["kv_channels"] = m.head_dim
    if lay.dtype == "fp8":
        exp["fp8_recipe"] = FP8_RECIPE
    if lay.cuda_graphs:
        exp["cuda_graph_impl"] = "full_iteration"
    elif lay.cuda_graph_modules:
        exp["cuda_graph_impl"] = "transformer_engine"
    if m.is_moe:
        flex = lay.moe_dispatcher != "alltoall"
        exp.update(expert_tensor_parallel_size=lay.etp,
                   num_moe_experts=m.num_experts, moe_router_topk=m.experts_top_k,
                   moe_ffn_hidden_size=m.expert_ffn_hidden_size,
                   moe_token_dispatcher_type="flex" if flex else "alltoall", moe_grouped_gemm=True,
                   overlap_moe_expert_parallel_comm=lay.moe_a2a_overlap)
        if flex:
            exp["moe_flex_dispatcher_backend"] = lay.moe_dispatcher
    if m.layer_pattern:  # hybrid: the Mamba-2 shape (TransformerConfig's mamba_* fields)
        exp.update(is_hybrid_model=True, mamba_num_heads=m.mamba_num_heads,
                   mamba_head_dim=m.mamba_head_dim, mamba_state_dim=m.mamba_state_dim,
                   mamba_num_groups=m.mamba_groups)
    return exp


def _expected_args(plan) -> dict:
    m, lay = plan.model, plan.layout
    arch, _ = architecture(m)
    exp = {
        "micro_batch_size": lay.micro_batch_size, "global_batch_size": lay.global_batch_size,
        "seq_length": lay.seq_len, "position_embedding_type": arch.position_embedding,
        "untie_embeddings_and_output_weights": not m.tied_embeddings,
        "use_distributed_optimizer": lay.distributed_optimizer,
        "overlap_grad_reduce": lay.dp * lay.cp > 1 and plan.cluster.gpu.dp_comm_overlap > 0,
        "data_parallel_size": lay.dp,
    }
    exp["overlap_param_gather"] = exp["overlap_grad_reduce"] and (lay.distributed_optimizer
                                                                  or lay.fsdp)
    exp["use_distributed_optimizer"] = lay.distributed_optimizer or lay.fsdp
    # fp8 parameters, as the memory model's fp8 weights assume (memory.fp8_weight_bytes)
    exp["fp8_param_gather"] = lay.dtype in ("fp8", "mxfp8") and lay.distributed_optimizer
    # sharding and main-grad precision (issue 14): what the estimate modelled
    exp["use_megatron_fsdp"] = lay.fsdp
    exp["accumulate_allreduce_grads_in_fp32"] = lay.grad_reduce_fp32
    if lay.fsdp:
        exp["data_parallel_sharding_strategy"] = lay.fsdp_strategy
        exp["num_distributed_optimizer_instances"] = lay.dp_replicate
    if arch.position_embedding == "rope":
        exp["rotary_base"] = arch.rope_theta
        exp["rotary_percent"] = arch.rotary_fraction
        scaling = arch.rope_scaling
        exp["use_rope_scaling"] = scaling is not None and scaling.kind == "llama3"
        if exp["use_rope_scaling"]:
            exp["rope_scaling_factor"] = scaling.factor
    return exp


def _hybrid_stage_split(args, plan) -> list[tuple[int, int, int, int]]:
    """As `_stage_split` for a hybrid: Megatron-Core's select_pipeline_segment on the parsed
    --hybrid-layer-pattern, asked as each stage's pipeline rank (the process group's rank and
    size are what it reads; there is no process group here)."""
    import torch
    from megatron.core.models.hybrid import hybrid_layer_allocation as alloc

    lay, out = plan.layout, []
    alloc.log_on_each_pipeline_stage = lambda *args, **kwargs: None  # needs a process group
    select_pipeline_segment = alloc.select_pipeline_segment
    real = torch.distributed.get_rank, torch.distributed.get_world_size
    try:
        for stage in plan.stages:
            torch.distributed.get_rank = lambda group=None, r=stage.pp_rank: r
            torch.distributed.get_world_size = lambda group=None: lay.pp
            layers, first = select_pipeline_segment(args.hybrid_layer_pattern, object(),
                                                    stage.chunk if lay.vp > 1 else None)
            out.append((stage.pp_rank, stage.chunk, first, len(layers)))
    finally:
        torch.distributed.get_rank, torch.distributed.get_world_size = real
    return out


def _stage_split(mega, config, plan) -> list[tuple[int, int, int, int]]:
    """(pp_rank, chunk, first layer, layers) as Megatron builds them, in plan stage order."""
    from megatron.core import parallel_state

    _, _, count, offset = mega
    lay, out = plan.layout, []
    # As Megatron's own unit tests do: the layout path reads the rank from parallel_state.
    parallel_state.set_pipeline_model_parallel_world_size(lay.pp)
    parallel_state.set_virtual_pipeline_model_parallel_world_size(lay.vp if lay.vp > 1 else None)
    for stage in plan.stages:
        vp = stage.chunk if lay.vp > 1 else None
        parallel_state.set_pipeline_model_parallel_rank(stage.pp_rank)
        out.append((stage.pp_rank, stage.chunk,
                    offset(config, vp_stage=vp, pp_rank=stage.pp_rank),
                    count(config, vp_stage=vp, pp_rank=stage.pp_rank)))
    return out


def _activation_name(config) -> str:
    return getattr(config.activation_func, "__name__", str(config.activation_func))


def check_plan(mega, plan, with_env: bool = True) -> dict:
    """Run Megatron on the plan's arguments; 'differences' lists each mismatch."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Megatron prints every argument
            args, config = _run_megatron(mega, plan, with_env)
    except (AssertionError, ValueError, TypeError, SystemExit) as exc:
        return {"accepted": False, "differences": [f"rejected: {type(exc).__name__}: {exc}"]}
    diffs = []
    for key, want in _expected(plan).items():
        got = getattr(config, key, None)
        if got != want and not (got is None and want in (1, False)):
            diffs.append(f"TransformerConfig.{key} = {got!r}, plan wants {want!r}")
    for key, want in _expected_args(plan).items():
        got = getattr(args, key, None)
        if got != want:
            diffs.append(f"args.{key} = {got!r}, plan wants {want!r}")
    act = _activation_name(config)
    want_act = {"gated_silu": "silu", "gelu": "gelu", "squared_relu": "squared_relu"}[plan.model.mlp_kind]
    if want_act not in act:
        diffs.append(f"activation {act}, plan wants {want_act}")
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    padded = vocab_size_with_padding(plan.model.vocab_size, args, logging_enabled=False)
    split = _hybrid_stage_split(args, plan) if plan.model.layer_pattern \
        else _stage_split(mega, config, plan)
    want_split = [(s.pp_rank, s.chunk, s.first_layer, s.num_layers) for s in plan.stages]
    if split != want_split:
        diffs.append(f"stage split {split}, plan {want_split}")
    return {"accepted": True, "differences": diffs,
            "stages": [n for *_, n in split], "padded_vocab": padded,
            "env": megatron_env(plan)}


def _commit(src: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-src", required=True, type=Path)
    parser.add_argument("--commit", help="Megatron-LM commit of --megatron-src (default: git HEAD)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--without-env", action="store_true",
                        help="leave out the environment launch writes (shows Megatron's assertion)")
    parser.add_argument("plans", nargs="+", type=Path)
    opts = parser.parse_args(argv)
    if not (opts.megatron_src / "megatron" / "training" / "arguments.py").is_file():
        print(f"{opts.megatron_src} is not a Megatron-LM checkout (no megatron/training/arguments.py)",
              file=sys.stderr)
        return 2
    mega = _import_megatron(opts.megatron_src.resolve())
    results = {}
    for path in opts.plans:
        results[str(path)] = check_plan(mega, read_plan(path), not opts.without_env)
    commit = opts.commit or _commit(opts.megatron_src)
    bad = {p: r for p, r in results.items() if not r["accepted"] or r["differences"]}
    if opts.json:
        print(json.dumps({"megatron_commit": commit, "results": results}, indent=1))
    else:
        print(f"Megatron-LM {commit}")
        for path, res in results.items():
            state = "accepted" if res["accepted"] else "REJECTED"
            extra = f", stages {res['stages']}" if res["accepted"] else ""
            print(f"{path}: {state}, {len(res['differences'])} differences{extra}")
            for line in res["differences"]:
                print(f"  {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
