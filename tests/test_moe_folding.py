"""Expert degrees folded over the attention ranks (Megatron-Core MoE parallel folding), the
expert GEMM efficiency curve and the MoE launch arguments.

Liu et al. 2025, "MoE Parallel Folding" (arXiv:2504.14960): attention uses tp x cp x dp x pp,
the MoE layers etp x ep x edp x pp over the same GPUs, so etp*ep must divide tp*cp*dp.
"""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cost_models import megatron
from cost_models.dims import ParallelDims, expert_degrees
from cost_models.grid import LayoutGrid
from cost_models.specs import Layout, SpecError
from planner.specfiles import load_cluster, load_model

QWEN235 = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "Qwen3-235B-A22B.json"
DSV3 = load_model("deepseek-v3")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(not QWEN235.exists(), reason="shared/data not beside the checkout")
def test_published_qwen3_235b_layout_is_accepted_and_a_broken_folding_is_named():
    common = ["estimate", "--model", str(QWEN235), "--cluster", "dgx-h100", "--nodes", "32",
              "--seq-len", "4096", "--global-batch-size", "8192", "--tp", "2", "--pp", "8",
              "--ep", "32", "--vp", "4", "--micro-batch-size", "1", "--dtype", "fp8"]
    ok = _cli(*common, "--etp", "1", "--json")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["layout"]["ep"] == 32 and out["layout"]["etp"] == 1 and out["layout"]["dp"] == 16
    assert out["breakdown"]["ep_comm_s"] > 0
    bad = _cli(*common, "--etp", "2")  # etp*ep = 64 does not divide tp*cp*dp = 32
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "etp*ep = 2*32 = 64 must divide tp*cp*dp" in bad.stderr
    assert "folding" in bad.stderr


def test_expert_groups_follow_the_folded_mesh():
    d = ParallelDims(tp=2, pp=8, dp=16, ep=32, etp=1)
    assert d.group("ep").size == 32 and d.group("ep").stride == 1  # etp-ep-edp-pp
    assert d.expert_dp == 1 and d.group("edp").stride == 32
    d = ParallelDims(tp=4, pp=1, dp=16, ep=8, etp=2)
    assert d.group("ep").stride == 2 and d.expert_dp == 4
    # ep may now exceed dp*cp: experts borrow the tensor-parallel ranks (tp 8, dp 2, ep 16)
    assert 16 in expert_degrees(DSV3, 8 * 2, 1) and 16 not in expert_degrees(DSV3, 8 * 2, 2)


def test_etp_splits_expert_weights_and_moves_their_tokens():
    h100 = load_cluster("dgx-h100", nodes=8)
    lay = Layout(tp=4, pp=4, dp=4, ep=4, etp=1, micro_batch_size=1, global_batch_size=64,
                 seq_len=4096, sequence_parallel=True)
    whole = megatron.estimate(DSV3, h100, lay)
    split = megatron.estimate(DSV3, h100, replace(lay, etp=4, ep=4))
    # etp=4 stores a quarter of each expert per GPU ...
    assert split.memory.weights_bytes < whole.memory.weights_bytes
    # ... and every GPU of the etp group keeps all the group's routed token copies
    assert split.memory.activations_bytes > whole.memory.activations_bytes
    with pytest.raises(SpecError, match=r"etp=3 must divide the expert MLP width 2048 .*"
                       r"choose --etp from 1, 2, 4, 8, 16, 32, 64, 128, \.\.\.$"):
        replace(lay, etp=3).validate(DSV3, 64)
    with pytest.raises(SpecError, match=r"ep=3 must divide the 256 experts; choose --ep from "
                       r"1, 2, 4, 8, 16, 32, 64, 128, \.\.\.$"):
        replace(lay, ep=3, dp=3).validate(DSV3, 48)


def test_etp_defaults_to_tp_as_megatron_core():
    lay = Layout(tp=4, pp=1, dp=2, micro_batch_size=1, global_batch_size=8, seq_len=1024)
    assert lay.etp == 4 and Layout.from_dict(lay.to_dict()).etp == 4


def test_grouped_gemm_slows_with_few_tokens_per_expert():
    """Per token, the routed experts cost more when each local expert gets fewer rows."""
    gpu = load_cluster("dgx-h100", nodes=1).gpu

    def per_token_s(mbs: int, ep: int) -> float:
        lay = Layout(tp=1, pp=1, dp=8, ep=ep, micro_batch_size=mbs, global_batch_size=8 * mbs,
                     seq_len=4096)
        g = LayoutGrid.from_layout(lay, DSV3.num_layers)
        tokens = mbs * 4096
        fwd, _ = megatron.expert_gemm_times(DSV3, gpu, g, tokens,
                                            megatron.routed_expert_flops(DSV3, tokens))
        return float(fwd[0] if hasattr(fwd, "__len__") else fwd) / tokens

    assert per_token_s(1, 1) > per_token_s(4, 1)   # more rows per expert: closer to peak
    assert per_token_s(1, 1) > per_token_s(1, 8)   # 8x fewer local experts: 8x the rows each
    imbalanced = replace(DSV3, expert_load_imbalance=1.3)
    assert megatron.expert_rows(imbalanced, LayoutGrid.from_layout(
        Layout(tp=1, pp=1, dp=8, ep=8, micro_batch_size=1, global_batch_size=8, seq_len=4096),
        DSV3.num_layers), 4096)[0] == pytest.approx(1.3 * 4096 * 8 / 32)


def test_grouped_gemm_efficiency_follows_the_problem_size_not_the_rows_alone():
    """At equal rows per local expert, wider experts (more FLOPs per problem) run closer to
    peak: the fixed cost per expert problem is amortised over more work, W/(W + W_half)."""
    gpu = load_cluster("dgx-h100", nodes=1).gpu
    lay = Layout(tp=1, pp=1, dp=8, ep=8, micro_batch_size=1, global_batch_size=8, seq_len=4096)
    g = LayoutGrid.from_layout(lay, DSV3.num_layers)

    def seconds_per_flop(model) -> float:
        routed = megatron.routed_expert_flops(model, 4096)
        fwd, _ = megatron.expert_gemm_times(model, gpu, g, 4096, routed)
        return float(fwd[0] if hasattr(fwd, "__len__") else fwd) / float(routed)

    narrow = replace(DSV3, expert_ffn_hidden_size=DSV3.expert_ffn_hidden_size // 4)
    assert megatron.expert_rows(narrow, g, 4096)[0] == megatron.expert_rows(DSV3, g, 4096)[0]
    assert megatron.expert_gemm_flops(DSV3, g, 4096)[0] == pytest.approx(
        4 * megatron.expert_gemm_flops(narrow, g, 4096)[0])
    assert seconds_per_flop(narrow) > 1.2 * seconds_per_flop(DSV3)
