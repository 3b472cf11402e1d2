"""Megatron-LM arguments say what the plan says, for every model family.

Two levels:
- Always: every flag is a real Megatron-LM option (tests/data/framework_args_megatron.txt,
  NVIDIA/Megatron-LM@d98e8a64), and reading the arguments back with Megatron's semantics
  (pipeline layout / first-last / virtual stage flags, --swiglu, --num-query-groups...)
  rebuilds the plan's model shape, architecture, layout and stage split.
- With MEGATRON_LM_SRC=<a Megatron-LM checkout>: benchmarks/check_megatron_args.py runs
  Megatron's own parse_args + validate_args + core_transformer_config_from_args on each plan's
  arguments and compares the TransformerConfig and the layers each stage builds with the plan
  (CI cannot fetch GitHub, so it skips there, saying why). Without the environment `launch`
  writes, Megatron must reject tp > 1 on Hopper: that proves the check can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import frameworks
from launcher.architecture import architecture
from planner.planfile import write_plan

sys.path.insert(0, str(Path(__file__).parent))
import launch_plans  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
PLANS = {**{k: ("a", k) for k in launch_plans.ACCEPTANCE}, **{k: ("f", k) for k in launch_plans.FAMILIES}}


def _plan(name: str):
    table = launch_plans.ACCEPTANCE if PLANS[name][0] == "a" else launch_plans.FAMILIES
    return launch_plans.make(name, table)


def _parse(args: list[str]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else "--"
            out[arg[2:]] = True if nxt.startswith("--") else nxt
    return out


def _megatron_split(f: dict, layers: int, pp: int) -> tuple[int, list[int]]:
    """(vp, layers per virtual stage in model order) as Megatron derives them."""
    if "hybrid-layer-pattern" in f:  # hybrid: '|' between stages, vp from the segment count
        segments = str(f["hybrid-layer-pattern"]).split("|")
        return max(len(segments) // pp, 1), [len(seg) for seg in segments]
    if "pipeline-model-parallel-layout" in f:
        entries = str(f["pipeline-model-parallel-layout"]).split("|")
        sizes = [int(e.strip("EL").split("*")[1]) for e in entries]
        return len(sizes) // pp, sizes
    if "decoder-first-pipeline-num-layers" in f:
        first, last = int(f["decoder-first-pipeline-num-layers"]), int(f["decoder-last-pipeline-num-layers"])
        middle = (layers - first - last) // (pp - 2) if pp > 2 else 0
        return 1, [first] + [middle] * (pp - 2) + [last]
    if "num-layers-per-virtual-pipeline-stage" in f:
        per = int(f["num-layers-per-virtual-pipeline-stage"])
        return layers // (per * pp), [per] * (layers // per)
    return 1, [layers // pp] * pp


@pytest.mark.parametrize("name", PLANS)
def test_megatron_flags_are_real(name):
    text = (DATA / "framework_args_megatron.txt").read_text()
    known = {ln.strip() for ln in text.splitlines() if ln.startswith("--")}
    flags = {a for a in frameworks.megatron_args(_plan(name)) if a.startswith("--")}
    assert flags <= known, sorted(flags - known)


@pytest.mark.parametrize("name", PLANS)
def test_megatron_args_rebuild_the_plan(name):
    plan = _plan(name)
    m, lay, arch = plan.model, plan.layout, architecture(plan.model)[0]
    f = _parse(frameworks.megatron_args(plan))
    shape = dict(num_layers=int(f["num-layers"]), hidden=int(f["hidden-size"]),
                 ffn=int(f["ffn-hidden-size"]), heads=int(f["num-attention-heads"]),
                 head_dim=int(f["kv-channels"]), tied="untie-embeddings-and-output-weights" not in f,
                 mlp="gated_silu" if "swiglu" in f else "squared_relu" if "squared-relu" in f else "gelu")
    assert shape == dict(num_layers=m.num_layers, hidden=m.hidden_size, ffn=m.ffn_hidden_size,
                         heads=m.num_heads, head_dim=m.head_dim, tied=m.tied_embeddings,
                         mlp=m.mlp_kind)
    if arch.mla is None:
        assert int(f.get("num-query-groups", m.num_heads)) == m.num_kv_heads
    else:
        assert "multi-latent-attention" in f and int(f["kv-lora-rank"]) == arch.mla.kv_lora_rank
    if m.is_moe:
        assert (int(f["num-experts"]), int(f["moe-router-topk"]), int(f["moe-ffn-hidden-size"])) == (
            m.num_experts, m.experts_top_k, m.expert_ffn_hidden_size)
        flex = lay.moe_dispatcher != "alltoall"
        assert f["moe-token-dispatcher-type"] == ("flex" if flex else "alltoall")
        assert f.get("moe-flex-dispatcher-backend") == (lay.moe_dispatcher if flex else None)
        assert f["moe-grouped-gemm"] is True
        assert ("overlap-moe-expert-parallel-comm" in f) == lay.moe_a2a_overlap
    args = frameworks.megatron_args(plan)
    graphs = args[args.index("--cuda-graph-modules") + 1:] if "--cuda-graph-modules" in args else []
    assert graphs[:len(lay.cuda_graph_modules)] == list(lay.cuda_graph_modules)
    assert (f.get("cuda-graph-impl") == "transformer_engine") == bool(lay.cuda_graph_modules)
    # architecture
    assert f["position-embedding-type"] == arch.position_embedding
    if arch.position_embedding == "rope":
        assert float(f["rotary-base"]) == arch.rope_theta
    assert ("use-rope-scaling" in f) == (arch.rope_scaling is not None and arch.rope_scaling.kind == "llama3")
    assert f["normalization"] == ("LayerNorm" if arch.norm == "LayerNorm1p" else arch.norm)
    assert ("disable-bias-linear" in f) == (not arch.linear_bias)
    assert ("qk-layernorm" in f) == arch.qk_norm
    assert float(f["hidden-dropout"]) == float(f["attention-dropout"]) == arch.dropout
    # layout, schedule, precision, overlaps
    assert (int(f["tensor-model-parallel-size"]), int(f["pipeline-model-parallel-size"]),
            int(f["context-parallel-size"]), int(f.get("expert-model-parallel-size", 1))) == (
        lay.tp, lay.pp, lay.cp, lay.ep)
    if m.is_moe:  # expert tensor parallelism always explicit (Megatron's default would be tp)
        assert int(f["expert-tensor-parallel-size"]) == lay.etp
    assert (int(f["micro-batch-size"]), int(f["global-batch-size"]), int(f["seq-length"])) == (
        lay.micro_batch_size, lay.global_batch_size, lay.seq_len)
    assert f.get("recompute-granularity", "none") == lay.recompute
    assert ("sequence-parallel" in f) == lay.sequence_parallel
    assert ("fp8-format" in f) == (lay.dtype == "fp8")
    assert ("tp-comm-overlap" in f) == (lay.sequence_parallel and lay.tp > 1)  # H100: 0.67
    assert "overlap-grad-reduce" in f and "use-distributed-optimizer" in f
    vp, sizes = _megatron_split(f, m.num_layers, lay.pp)
    assert vp == lay.vp and sizes == [s.num_layers for s in plan.stages]
    # Megatron-FSDP asserts CUDA_DEVICE_MAX_CONNECTIONS != 1; tp/cp on Hopper need it = 1
    assert frameworks.megatron_env(plan) == ({"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
                                             if (lay.tp > 1 or lay.cp > 1) and not lay.fsdp
                                             else {})
    assert ("use-megatron-fsdp" in f) == lay.fsdp
    assert int(f.get("num-distributed-optimizer-instances", 1)) == lay.dp_replicate


def test_hybrid_pattern_shape_and_spec():
    plan = _plan("nemotron3-nano")
    args = frameworks.megatron_args(plan)
    f = _parse(args)
    assert f["hybrid-layer-pattern"].replace("|", "") == plan.model.layer_pattern
    assert (int(f["mamba-num-heads"]), int(f["mamba-head-dim"]), int(f["mamba-state-dim"]),
            int(f["mamba-num-groups"])) == (64, 64, 128, 8)
    assert args[args.index("--spec") + 1:args.index("--spec") + 3] == [
        "megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"]
    assert f["position-embedding-type"] == "none" and f["moe-router-score-function"] == "sigmoid"
    assert "moe-layer-freq" not in f and "num-layers-per-virtual-pipeline-stage" not in f
    assert any("pretrain_hybrid.py" in n for n in frameworks.megatron_notes(plan))


def test_deepseek_dense_layers_and_router():
    f = _parse(frameworks.megatron_args(_plan("deepseek-v3")))
    assert f["moe-layer-freq"] == "([0]*3+[1]*58)"
    assert f["moe-router-score-function"] == "sigmoid" and f["rope-type"] == "yarn"


MEGATRON_SRC = os.environ.get("MEGATRON_LM_SRC")


@pytest.mark.skipif(not MEGATRON_SRC, reason="set MEGATRON_LM_SRC to a NVIDIA/Megatron-LM checkout "
                    "(CI cannot fetch GitHub) to run Megatron's own parser on the arguments")
def test_megatron_itself_accepts_every_plan(tmp_path):
    paths = []
    for name in PLANS:
        path = tmp_path / f"{name}.yaml"
        write_plan(_plan(name), path)
        paths.append(str(path))
    script = ROOT / "benchmarks" / "check_megatron_args.py"
    proc = subprocess.run([sys.executable, str(script), "--megatron-src", MEGATRON_SRC, "--json",
                           *paths], capture_output=True, text=True, timeout=600)
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    bad = {p: r["differences"] for p, r in report["results"].items() if r["differences"]}
    assert proc.returncode == 0 and not bad, bad
    stages = {Path(p).stem: r["stages"] for p, r in report["results"].items()}
    assert stages == {n: [s.num_layers for s in _plan(n).stages] for n in PLANS}
    neg = subprocess.run([sys.executable, str(script), "--megatron-src", MEGATRON_SRC,
                          "--without-env", paths[0]], capture_output=True, text=True, timeout=600)
    assert neg.returncode == 1 and "CUDA_DEVICE_MAX_CONNECTIONS" in neg.stdout
