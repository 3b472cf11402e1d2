"""FSDP / HSDP memory and the memory verdict against runs that ran (issue 14).

- FSDP2 shards: weights, grads and Adam state of the whole model are 4 + 4 + 8 bytes per
  parameter over the shard group (checked against `flops.parameter_count`, not the memory
  code); HSDP shards over dp/dp_replicate; bf16 main grads halve the grad buffers.
- The published runs that state a measured peak (benchmarks/validate_memory.py): the eight
  of the shared 2025-2026 file within the 10% goal.
- Zero false OOMs: every published run of both shared files that states its layout is judged
  to fit (with its recompute where stated) under the planner's headroom rule.
- `meshplan estimate --fsdp` names the sharded and in-flight terms (run as a process).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cost_models.errors import SpecError
from cost_models.flops import parameter_count
from cost_models.megatron import estimate
from cost_models.specs import GiB, Layout
from planner.options import DEFAULT_PLAN_HEADROOM
from planner.specfiles import load_cluster, load_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from published import CSV, CSV_2025, load_cases, load_cases_2025  # noqa: E402
from validate_memory import GOAL, predict, shared_file_runs  # noqa: E402


@pytest.fixture(scope="module")
def llama8b():
    return load_model("llama3.1-8b")


def _fsdp(dp: int, **kw) -> Layout:
    return Layout(tp=1, pp=1, dp=dp, micro_batch_size=1, global_batch_size=dp, seq_len=8192,
                  fsdp=True, framework="torchtitan", **kw)


def test_fsdp2_shards_every_state_over_the_shard_group(llama8b):
    params = parameter_count(llama8b)
    for nodes in (1, 16):
        dp = 8 * nodes
        est = estimate(llama8b, load_cluster("dgx-h100", nodes=nodes), _fsdp(dp))
        mem = est.memory
        assert mem.weights_bytes * dp == pytest.approx(4 * params, rel=1e-9)
        assert mem.grads_bytes * dp == pytest.approx(4 * params, rel=1e-9)
        assert mem.optimizer_state_bytes * dp == pytest.approx(8 * params, rel=1e-9)
        # two bf16 blocks (prefetch), one block's bf16 + fp32 grads, the bf16 LM head
        block = (params - 2 * llama8b.vocab_size * llama8b.hidden_size) / llama8b.num_layers
        head = llama8b.vocab_size * llama8b.hidden_size
        assert mem.unsharded_inflight_bytes == pytest.approx(
            2 * 2 * block + 6 * block + 2 * head, rel=0.01)
    # HSDP: replicate 2 x shard 64 holds twice the shard of FSDP over 128, and all-reduces it
    cluster = load_cluster("dgx-h100", nodes=16)
    full, hsdp = estimate(llama8b, cluster, _fsdp(128)), estimate(llama8b, cluster,
                                                                 _fsdp(128, dp_replicate=2))
    assert hsdp.memory.weights_bytes == pytest.approx(2 * full.memory.weights_bytes)
    assert hsdp.time.dp_comm_s > 0


def test_bf16_main_grads_halve_the_grad_buffers(llama8b):
    cluster = load_cluster("dgx-h100", nodes=1)
    lay = Layout(tp=2, pp=1, dp=4, micro_batch_size=1, global_batch_size=8, seq_len=8192,
                 sequence_parallel=True)
    fp32, bf16 = (estimate(llama8b, cluster, replace(lay, grad_reduce_fp32=g)) for g in (True, False))
    assert bf16.memory.grads_bytes == pytest.approx(fp32.memory.grads_bytes / 2)
    assert bf16.memory.weights_bytes == fp32.memory.weights_bytes


def test_hsdp_rules_are_explained(llama8b):
    cluster = load_cluster("dgx-h100", nodes=1)
    with pytest.raises(SpecError, match="needs --fsdp"):
        replace(_fsdp(8, dp_replicate=2), fsdp=False).validate(llama8b, 8)
    with pytest.raises(SpecError, match="must divide dp"):
        _fsdp(8, dp_replicate=3).validate(llama8b, 8)
    old = Layout.from_dict({"tp": 1, "pp": 1, "dp": 8, "micro_batch_size": 1,
                            "global_batch_size": 8, "seq_len": 8192})  # a plan file from before
    assert (old.fsdp, old.dp_replicate, old.grad_reduce_fp32) == (False, 1, True)
    estimate(llama8b, cluster, old)


@pytest.mark.skipif(not CSV_2025.exists(), reason=f"{CSV_2025} not present")
def test_measured_peaks_of_the_shared_file_within_goal():
    runs = shared_file_runs()
    assert len(runs) == 8
    errors = {run.source[:60]: predict(run).peak_GiB / run.measured_GiB - 1 for run in runs}
    assert all(abs(e) <= GOAL for e in errors.values()), errors


@pytest.mark.skipif(not (CSV.exists() and CSV_2025.exists()), reason="shared/ data not present")
def test_no_false_ooms_on_published_runs():
    false_ooms = []
    cases = load_cases(CSV)[0] + load_cases_2025(CSV_2025)[0]
    assert len(cases) >= 110
    for case in cases:
        ests = [estimate(case.model, case.cluster, lay, DEFAULT_PLAN_HEADROOM)
                for lay in case.layouts]
        if not any(e.fits for e in ests):
            false_ooms.append(case.label.split(None, 1)[1].strip())  # without the row number
    assert false_ooms == [], false_ooms


def test_estimate_fsdp_names_sharded_and_inflight_terms():
    base = ["--model", "llama3.1-8b", "--cluster", "dgx-h100", "--nodes", "16", "--seq-len",
            "8192", "--global-batch-size", "128", "--tp", "1", "--pp", "1",
            "--micro-batch-size", "1"]
    r = subprocess.run([sys.executable, "-m", "planner.cli", "estimate", *base, "--fsdp"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("weights (Megatron-FSDP bf16 shard /128)", "grads (fp32 shard /128)",
                 "optimizer (fp32 master + Adam shard /128)", "unsharded in flight", "fsdp"):
        assert name in r.stdout, r.stdout
    titan = subprocess.run([sys.executable, "-m", "planner.cli", "estimate", *base, "--fsdp",
                            "--framework", "torchtitan"], capture_output=True, text=True)
    assert "weights (FSDP2 fp32 shard /128)" in titan.stdout, titan.stdout
    bad = subprocess.run([sys.executable, "-m", "planner.cli", "estimate", *base,
                          "--dp-replicate", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "needs --fsdp" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_unsharded_bytes_stay_small_next_to_the_states_they_replace(llama8b):
    """FSDP over 128 ranks needs less than a tenth of ZeRO-1's weights + grads + optimizer."""
    cluster = load_cluster("dgx-h100", nodes=16)
    fsdp = estimate(llama8b, cluster, _fsdp(128)).memory
    zero1 = estimate(llama8b, cluster, replace(_fsdp(128), fsdp=False)).memory
    states = lambda m: m.weights_bytes + m.grads_bytes + m.optimizer_state_bytes  # noqa: E731
    assert states(fsdp) + fsdp.unsharded_inflight_bytes < 0.3 * states(zero1)
    assert fsdp.unsharded_inflight_bytes < 4 * GiB


def test_search_considers_sharding_alongside_the_degrees(llama8b):
    from planner.search import SearchSpace, generate

    both = generate(llama8b, 16, 8, 8192, 128, SearchSpace(fsdp=(False, True), dp_replicate=2))
    fs, rep = both.column("fsdp"), both.column("dp_replicate")
    assert fs.any() and (~fs).any()
    assert (rep[fs] == 2).all() and (rep[~fs] == 1).all() and (both.dp[fs] % 2 == 0).all()
    assert both.distributed_optimizer[fs].all()  # FSDP rows are not doubled by the ZeRO-1 axis
    only = generate(llama8b, 16, 8, 8192, 128, SearchSpace(fsdp=(True,)))
    assert only.column("fsdp").all()
    lay = only.layout(0)
    assert lay.fsdp and lay.framework == "megatron"


def test_torchtitan_sequence_parallel_keeps_the_gathered_linear_inputs():
    """torchtitan's TP plan all-gathers the norm output before the column-parallel linears and
    autograd saves it whole; Megatron saves the shard: with tp 8 the torchtitan layer holds
    7/8 of two h-wide bf16 inputs more (full-AC rows: only in the rematerialised layer)."""
    from cost_models import memory

    model = load_model("llama3.1-70b")
    cluster = load_cluster("dgx-h100", nodes=4)
    lay = Layout(tp=8, pp=1, dp=4, micro_batch_size=1, global_batch_size=4, seq_len=8192,
                 sequence_parallel=True, fsdp=True, recompute="none")
    titan, mega = (estimate(model, cluster, replace(lay, framework=f)).memory
                   for f in ("torchtitan", "megatron"))
    per_layer = 2 * 2 * 8192 * model.hidden_size * (1 - 1 / 8)
    assert memory.titan_gathered_input_bytes(model, 1, 8192, 8, 1, 2) == per_layer
    # activations also differ by the loss buffers (fp32 for torchtitan); compare per layer
    terms = {f: memory.activation_terms(model, _grid(replace(lay, framework=f), model))
             for f in ("torchtitan", "megatron")}
    assert float(terms["torchtitan"].per_layer[0] - terms["megatron"].per_layer[0]) == \
        pytest.approx(per_layer)
    assert titan.activations_bytes > mega.activations_bytes
    full = replace(lay, recompute="full")
    t_full = memory.activation_terms(model, _grid(replace(full, framework="torchtitan"), model))
    m_full = memory.activation_terms(model, _grid(full, model))
    assert float(t_full.per_layer[0]) == pytest.approx(float(m_full.per_layer[0]))
    assert float(t_full.no_recompute[0] - m_full.no_recompute[0]) == pytest.approx(per_layer)


def _grid(lay: Layout, model):
    from cost_models.grid import LayoutGrid

    return LayoutGrid.from_layout(lay, model.num_layers)


def test_megatron_fsdp_zero2_keeps_parameters_whole(llama8b):
    """optim_grads (ZeRO-2): bf16 parameters whole on every rank, main grads and optimizer
    state sharded as with optim_grads_params, no parameter in flight, no per-block gather
    (gathered once per step instead)."""
    cluster = load_cluster("dgx-h100", nodes=16)
    lay = Layout(tp=1, pp=1, dp=128, micro_batch_size=1, global_batch_size=512, seq_len=8192,
                 fsdp=True, grad_reduce_fp32=False)  # 4 micro-batches: ZeRO-3 gathers 8x a block
    z3 = estimate(llama8b, cluster, lay)
    z2 = estimate(llama8b, cluster, replace(lay, fsdp_strategy="optim_grads"))
    params = parameter_count(llama8b)
    assert z2.memory.weights_bytes == pytest.approx(2 * params, rel=1e-9)
    assert z2.memory.grads_bytes == pytest.approx(z3.memory.grads_bytes)
    assert z2.memory.optimizer_state_bytes == pytest.approx(z3.memory.optimizer_state_bytes)
    block = (params - 2 * llama8b.vocab_size * llama8b.hidden_size) / llama8b.num_layers
    # one block's gradients: autograd's bf16 + Megatron-FSDP's bf16 unreduced bucket
    assert z2.memory.unsharded_inflight_bytes == pytest.approx(4 * block, rel=0.01)
    z2_fp32 = estimate(llama8b, cluster, replace(lay, fsdp_strategy="optim_grads",
                                                 grad_reduce_fp32=True))
    assert z2_fp32.memory.unsharded_inflight_bytes == pytest.approx(6 * block, rel=0.01)
    # on slow links the per-micro-batch gathers show: ZeRO-2's one gather a step costs less
    slow = load_cluster("jean-zay-a100", nodes=16)
    lay_a100 = replace(lay, seq_len=2048)
    assert estimate(llama8b, slow, replace(lay_a100, fsdp_strategy="optim_grads")).time.dp_comm_s \
        < 0.8 * estimate(llama8b, slow, lay_a100).time.dp_comm_s
    from launcher import torchtitan
    from planner.planfile import Plan

    zero2 = replace(lay, fsdp_strategy="optim_grads")
    plan = Plan(llama8b, cluster, zero2, tuple(n.name for n in cluster.nodes), {})
    assert any("no ZeRO-2" in n for n in torchtitan.notes(plan))
    for bad in (replace(lay, fsdp=False, fsdp_strategy="optim_grads"),
                replace(lay, framework="torchtitan", fsdp_strategy="optim_grads")):
        with pytest.raises(SpecError, match="Megatron-FSDP's and needs --fsdp"):
            bad.validate(llama8b, 128)


def test_torchtitan_reshard_policy_trades_gathers_for_memory(llama8b):
    """never: every block stays gathered from its forward to its backward (the stage's bf16
    parameters in flight, no backward gather); always with pp: only two blocks, and the
    backward gathers again; default: torchtitan's (reshard unless pp)."""
    cluster = load_cluster("jean-zay-a100", nodes=4)
    lay = Layout(tp=1, pp=1, dp=32, micro_batch_size=1, global_batch_size=64, seq_len=2048,
                 fsdp=True, framework="torchtitan")
    default, never = (estimate(llama8b, cluster, replace(lay, fsdp_reshard_after_forward=r))
                      for r in ("default", "never"))
    block = (parameter_count(llama8b) - 2 * llama8b.vocab_size * llama8b.hidden_size) \
        / llama8b.num_layers
    extra = never.memory.unsharded_inflight_bytes - default.memory.unsharded_inflight_bytes
    assert extra == pytest.approx(2 * block * (llama8b.num_layers - 2), rel=1e-6)
    assert never.time.dp_comm_s < 0.8 * default.time.dp_comm_s
    piped = replace(lay, pp=2, dp=16)
    keep, always = (estimate(llama8b, cluster, replace(piped, fsdp_reshard_after_forward=r))
                    for r in ("default", "always"))
    assert always.memory.unsharded_inflight_bytes < keep.memory.unsharded_inflight_bytes
    with pytest.raises(SpecError, match="torchtitan's FSDP2 policy"):
        replace(lay, framework="megatron", fsdp_reshard_after_forward="never").validate(
            llama8b, 32)
