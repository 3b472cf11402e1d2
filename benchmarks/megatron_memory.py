"""meshplan's memory breakdown next to Megatron-LM's own theoretical memory report.

Megatron-LM prints a "theoretical memory footprint" at start-up
(megatron/training/theoretical_memory_usage.py: `compute_weight_and_optimizer_memory` and the
activation functions, from Korthikanti et al. 2022 Table 2). This script runs *that code*, from
a Megatron-LM checkout you point it at, on the same layouts `meshplan estimate` predicts, and
prints both side by side (GiB per GPU, most loaded rank). docs/memory_vs_megatron.md explains
every difference.

    git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout d98e8a64
    python benchmarks/megatron_memory.py --megatron-src Megatron-LM [--markdown]

Only theoretical_memory_usage.py is loaded (its one relative import, `.utils`, gets a stub
with `is_hybrid_model` and `print_rank_0`), so no GPU, torch build or Megatron install is
needed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cost_models.dims import derived_dp  # noqa: E402
from planner.specfiles import load_model  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
# (label, model, cluster, nodes, seq, gbs, tp, pp, cp, vp, ep, mbs, recompute)
CASES = [
    ("Llama 3.1 8B, 8 H100, tp1 dp8", "llama3.1-8b", "dgx-h100", 1, 8192, 128, 1, 1, 1, 1, 1, 1, "selective"),
    ("Llama 3.1 8B, 8 H100, tp2 pp2 dp2", "llama3.1-8b", "dgx-h100", 1, 8192, 128, 2, 2, 1, 1, 1, 1, "selective"),
    ("Llama 3.1 70B, 64 H100, tp4 pp4 cp2 vp5", "llama3.1-70b", "dgx-h100", 8, 8192, 128, 4, 4, 2, 5, 1, 1, "selective"),
    ("Llama 3.1 70B, 64 H100, tp8 pp8 cp1", "llama3.1-70b", "dgx-h100", 8, 8192, 128, 8, 8, 1, 1, 1, 1, "selective"),
    ("GPT-3 175B, 1024 A100, tp8 pp16 (Narayanan)", "gpt3-175b", "dgx-a100", 128, 2048, 1536, 8, 16, 1, 1, 1, 1, "selective"),
    ("Llama 3.1 405B, 1024 H100, tp8 pp16 vp4", "llama3.1-405b", "dgx-h100", 128, 8192, 512, 8, 16, 1, 4, 1, 1, "selective"),
    ("Mixtral 8x7B, 64 H100, tp1 pp4 ep8", "mixtral-8x7b", "dgx-h100", 8, 4096, 256, 1, 4, 1, 1, 8, 1, "selective"),
]


def load_megatron(src: Path):
    """Megatron-LM's theoretical_memory_usage module, loaded from `src` with a stub `.utils`."""
    path = src / "megatron" / "training" / "theoretical_memory_usage.py"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; pass --megatron-src pointing at a Megatron-LM checkout")
    package = types.ModuleType("mlm_training")
    package.__path__ = []
    utils = types.ModuleType("mlm_training.utils")
    utils.is_hybrid_model = lambda args: False
    utils.print_rank_0 = lambda *a, **k: None
    sys.modules.update({"mlm_training": package, "mlm_training.utils": utils})
    spec = importlib.util.spec_from_file_location("mlm_training.theoretical_memory_usage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def megatron_args(model, world: int, tp: int, pp: int, cp: int, vp: int, ep: int, mbs: int,
                  seq: int, recompute: str) -> argparse.Namespace:
    """The Megatron-LM arguments of the planned run (as meshplan launch writes them)."""
    dp = derived_dp(world, tp=tp, pp=pp, cp=cp)
    divisible = 128 * tp  # --make-vocab-size-divisible-by 128, times tp (Megatron pads so)
    padded_vocab = -(-model.vocab_size // divisible) * divisible
    moe = model.is_moe
    return argparse.Namespace(
        kv_channels=model.head_dim, num_attention_heads=model.num_heads,
        hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_hidden_size,
        group_query_attention=model.num_kv_heads != model.num_heads,
        num_query_groups=model.num_kv_heads, num_layers=model.num_layers,
        num_experts=model.num_experts if moe else None,
        moe_ffn_hidden_size=model.expert_ffn_hidden_size if moe else None,
        moe_router_topk=model.experts_top_k if moe else 2, moe_layer_freq=1,
        moe_shared_expert_intermediate_size=model.shared_expert_ffn_hidden_size or None,
        moe_latent_size=None, mtp_num_layers=None, add_bias_linear=False,
        swiglu=model.gated_mlp, normalization="RMSNorm" if model.gated_mlp else "LayerNorm",
        multi_latent_attention=False, padded_vocab_size=padded_vocab,
        untie_embeddings_and_output_weights=not model.tied_embeddings,
        expert_tensor_parallel_size=tp, expert_model_parallel_size=ep,
        pipeline_model_parallel_size=pp, tensor_model_parallel_size=tp, world_size=world,
        data_parallel_size=dp, use_distributed_optimizer=True, seq_length=seq,
        micro_batch_size=mbs, virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
        sequence_parallel=tp > 1, recompute_granularity="selective" if recompute == "selective" else None,
    )


def meshplan_memory(name: str, cluster: str, nodes: int, seq: int, gbs: int, tp: int, pp: int,
                    cp: int, vp: int, ep: int, mbs: int, recompute: str) -> dict:
    cmd = [sys.executable, "-m", "planner.cli", "estimate", "--model", name, "--cluster", cluster,
           "--nodes", str(nodes), "--seq-len", str(seq), "--global-batch-size", str(gbs),
           "--tp", str(tp), "--pp", str(pp), "--cp", str(cp), "--vp", str(vp), "--ep", str(ep),
           "--micro-batch-size", str(mbs), "--recompute", recompute, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode not in (0, 3):  # 3: does not fit, the breakdown is still printed
        raise SystemExit(f"error: {' '.join(cmd)}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)["memory"]


def compare(mlm, case) -> dict:
    label, name, cluster, nodes, seq, gbs, tp, pp, cp, vp, ep, mbs, recompute = case
    model = load_model(name)
    world = nodes * 8
    args = megatron_args(model, world, tp, pp, cp, vp, ep, mbs, seq, recompute)
    dp = derived_dp(world, tp=tp, pp=pp, cp=cp)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its own report
        weights_opt = mlm.compute_weight_and_optimizer_memory(args) / GiB
        if args.sequence_parallel and args.recompute_granularity == "selective":
            acts = mlm.compute_activation_memory(args, num_microbatches=gbs // (dp * mbs)) / GiB
        else:
            acts = mlm.compute_activation_memory_without_sp(args, num_microbatches=gbs // (dp * mbs)) / GiB
    ours = meshplan_memory(name, cluster, nodes, seq, gbs, tp, pp, cp, vp, ep, mbs, recompute)
    ours_wo = ours["weights_GiB"] + ours["grads_GiB"] + ours["optimizer_GiB"]
    return {"case": label, "megatron_weights_optimizer_GiB": weights_opt,
            "meshplan_weights_optimizer_GiB": ours_wo, "megatron_activations_GiB": acts,
            "meshplan_activations_GiB": ours["activations_GiB"],
            "meshplan_buffers_GiB": ours["buffers_GiB"], "megatron_total_GiB": weights_opt + acts,
            "meshplan_peak_GiB": ours["peak_GiB"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megatron-src", type=Path, required=True,
                    help="Megatron-LM checkout (the figures in docs/ used d98e8a64)")
    ap.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    args = ap.parse_args()
    mlm = load_megatron(args.megatron_src)
    rows = [compare(mlm, case) for case in CASES]
    if args.markdown:
        print("| layout | weights+grads+optimizer: Megatron / meshplan | activations: Megatron / "
              "meshplan | meshplan buffers | total: Megatron / meshplan |")
        print("|---|---:|---:|---:|---:|")
    for r in rows:
        cells = (f"{r['megatron_weights_optimizer_GiB']:.1f} / {r['meshplan_weights_optimizer_GiB']:.1f}",
                 f"{r['megatron_activations_GiB']:.1f} / {r['meshplan_activations_GiB']:.1f}",
                 f"{r['meshplan_buffers_GiB']:.1f}",
                 f"{r['megatron_total_GiB']:.1f} / {r['meshplan_peak_GiB']:.1f}")
        if args.markdown:
            print(f"| {r['case']} | " + " | ".join(cells) + " |")
        else:
            print(f"{r['case']:<46} W+O {cells[0]:>13}  act {cells[1]:>13}  buf {cells[2]:>5}  "
                  f"total {cells[3]:>13} GiB")


if __name__ == "__main__":
    main()
