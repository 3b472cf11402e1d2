"""Hostile inputs across every command, each run as a real `meshplan` process.

Every case must end with exit 2 (bad input) or 3 (does not fit), one stderr line of at most
300 characters that starts with "error:" and says what is wrong and what to do, no traceback,
no output file left behind, and within 10 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

TIMEOUT_S = 10.0
BASE = ["--seq-len", "4096", "--global-batch-size", "64"]
H100 = ["--model", "llama3.1-8b", "--cluster", "dgx-h100", "--nodes", "2", *BASE]
EST = ["estimate", *H100, "--tp", "2", "--pp", "1", "--micro-batch-size", "1"]
EST_HYBRID = [*BASE, "--tp", "1", "--pp", "1", "--ep", "8", "--micro-batch-size", "1"]
ROOT = Path(__file__).resolve().parents[1]
CLUSTER_OK = """meshplan_cluster: 1
name: t
gpu_types:
  H100-SXM: {preset: H100-SXM}
intra_node: {kind: nvlink, bandwidth_GBps: 450, latency_s: 8.0e-6}
inter_node: {kind: infiniband, bandwidth_GBps: 50, latency_s: 1.2e-5}
nodes:
  - {name: a, gpus: 8, gpu: H100-SXM}
  - {name: b, gpus: 8, gpu: H100-SXM}
"""
LLAMA = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
         "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
         "vocab_size": 128256, "max_position_embeddings": 131072}


def meshplan(args: list[str], cwd: Path) -> tuple[int, str, str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start


def _cluster(text: str, **edits) -> str:
    data = yaml.safe_load(text)
    for path, value in edits.items():
        node = data
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[keys[-1]] = value
    return yaml.safe_dump(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    (d / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR" + bytes(range(256)))
    (d / "latin1.json").write_bytes('{"model_type": "llama", "name": "caf\xe9"}'.encode("latin-1"))
    (d / "empty.json").write_text("")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "notype.json").write_text(json.dumps({k: v for k, v in LLAMA.items() if k != "model_type"}))
    (d / "bert.json").write_text(json.dumps({**LLAMA, "model_type": "bert"}))
    (d / "nan.json").write_text(json.dumps(LLAMA).replace("4096", "NaN", 1))
    (d / "neg.json").write_text(json.dumps({**LLAMA, "hidden_size": -5}))
    (d / "huge.json").write_text(json.dumps({**LLAMA, "hidden_size": 10**30}))
    (d / "heads.json").write_text(json.dumps({**LLAMA, "num_key_value_heads": 7}))
    (d / "trunc.json").write_text(json.dumps(LLAMA)[:40])
    nano = json.loads((ROOT / "planner" / "data" / "models" / "nemotron-3-nano-30b-a3b.json")
                      .read_text())
    (d / "hybrid_short.json").write_text(json.dumps({**nano, "hybrid_override_pattern": "MEM*"}))
    (d / "hybrid_char.json").write_text(json.dumps(
        {**nano, "hybrid_override_pattern": nano["hybrid_override_pattern"][:-1] + "Q"}))
    (d / "hybrid_heads.json").write_text(json.dumps({**nano, "mamba_num_heads": 60}))
    (d / "confdir").mkdir()
    (d / "cluster_ok.yaml").write_text(CLUSTER_OK)
    (d / "c_nan_bw.yaml").write_text(CLUSTER_OK.replace("bandwidth_GBps: 50", "bandwidth_GBps: .nan"))
    (d / "c_inf_lat.yaml").write_text(CLUSTER_OK.replace("latency_s: 1.2e-5", "latency_s: .inf"))
    (d / "c_nan_peak.yaml").write_text(CLUSTER_OK.replace(
        "{preset: H100-SXM}", "{preset: H100-SXM, peak_tflops: {bf16: .nan, fp8: 1979}}"))
    (d / "c_nan_mem.yaml").write_text(CLUSTER_OK.replace(
        "{preset: H100-SXM}", "{preset: H100-SXM, memory_GiB: .nan}"))
    (d / "c_old_key.yaml").write_text(CLUSTER_OK.replace(
        "{preset: H100-SXM}", "{preset: H100-SXM, grouped_gemm_half_rows: 4096}"))
    (d / "c_neg_exp.yaml").write_text(CLUSTER_OK.replace(
        "{preset: H100-SXM}", "{preset: H100-SXM, tensor_flops_per_exp: -256}"))
    (d / "c_eff.yaml").write_text(CLUSTER_OK.replace("latency_s: 8.0e-6}", "latency_s: 8.0e-6, efficiency: 7}"))
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    (d / "c_bomb.yaml").write_text(CLUSTER_OK.replace("name: t\n", "name: t\n") +
                                   "measured:\n  notes:\n" + "".join(
                                       "    " + ln + "\n" for ln in bomb.splitlines()))
    (d / "c_unknown.yaml").write_text(CLUSTER_OK + "colour: blue\n")
    (d / "c_gpus.yaml").write_text(CLUSTER_OK.replace("{name: a, gpus: 8", "{name: a, gpus: 1000000"))
    (d / "c_nogpu.yaml").write_text(CLUSTER_OK.replace("{name: b, gpus: 8, gpu: H100-SXM}",
                                                       "{name: b, gpus: 8, gpu: Z9000}"))
    (d / "c_matrix.yaml").write_text(CLUSTER_OK + "measured:\n  bandwidth_GBps: [[0, .nan], [40, 0]]\n")
    (d / "c_dup.yaml").write_text(CLUSTER_OK.replace("{name: b,", "{name: a,"))
    (d / "c_binary.yaml").write_bytes(b"\x00\x01\x02meshplan_cluster: 1\xff\xfe")
    (d / "ro").mkdir()
    (d / "train.py").write_text("print('hi')\n")
    code, out, err, _ = meshplan(["plan", "--model", "tiny-gpt", "--cluster", "local-cpu",
                                  "--nodes", "2", "--gpus-per-node", "2", "--seq-len", "32",
                                  "--global-batch-size", "8", "--tp", "2", "--pp", "2", "-o",
                                  str(d / "plan.yaml")], d)
    assert code == 0, err
    plan = yaml.safe_load((d / "plan.yaml").read_text())
    (d / "plan_v2.yaml").write_text(yaml.safe_dump({**plan, "meshplan": 2}))
    gap = [dict(s) for s in plan["stages"]][1:]  # the first stage's layers are in no stage
    (d / "plan_gap.yaml").write_text(yaml.safe_dump({**plan, "stages": gap}))
    (d / "plan_node.yaml").write_text(yaml.safe_dump(
        {**plan, "placement": {**plan["placement"], "node_order": ["localnode0", "ghost"]}}))
    (d / "plan_split.yaml").write_text(yaml.safe_dump(
        {**plan, "layout": {**plan["layout"], "layers_per_stage": [1, 1]}}))
    (d / "plan_tp.yaml").write_text(yaml.safe_dump({**plan, "layout": {**plan["layout"], "tp": 3}}))
    (d / "plan_list.yaml").write_text("- meshplan\n")
    (d / "hosts_ghost").write_text("n0 host-a\nlocalnode1 host-b\n")
    (d / "hosts_bad").write_text("localnode0 host_a!\nlocalnode1 host-b\n")
    (d / "hosts_short").write_text("only-one\n")
    (d / "hosts_bin").write_bytes(b"\xff\xfe\x00\x01")
    (d / "afile").write_text("x")
    return d


# (args with {d} for the fixture directory, expected exit code, words the message must hold,
#  output paths that must not exist afterwards)
CASES = [
    # sizes and numbers on the command line
    (["plan", *H100[:4], "--nodes", "0", *BASE], 2, "--nodes", ()),
    (["plan", *H100[:4], "--nodes", "-3", *BASE], 2, "--nodes", ()),
    (["plan", *H100[:4], "--nodes", "1" + "0" * 30, *BASE], 2, "--nodes", ()),
    (["plan", *H100[:4], "--nodes", "200000", *BASE], 2, "limit", ()),
    (["plan", "--model", "tiny-gpt", "--cluster", "local-cpu", "--gpus-per-node", "5000", *BASE],
     2, "limit", ()),
    (["plan", *H100[:6], "--seq-len", "0", "--global-batch-size", "64"], 2, "--seq-len", ()),
    (["plan", *H100[:6], "--seq-len", "999999999999", "--global-batch-size", "64"], 2, "--seq-len", ()),
    (["plan", *H100[:6], "--seq-len", "4096", "--global-batch-size", "0"], 2, "global-batch", ()),
    (["plan", *H100[:6], "--seq-len", "4096", "--global-batch-size", "abc"], 2, "global-batch", ()),
    (["plan", *H100, "--mem-headroom", "nan"], 2, "--mem-headroom", ()),
    (["plan", *H100, "--mem-headroom", "inf"], 2, "--mem-headroom", ()),
    (["plan", *H100, "--mem-headroom", "0.9"], 2, "--mem-headroom", ()),
    (["plan", *H100, "--mem-headroom", "-0.1"], 2, "--mem-headroom", ()),
    (["plan", *H100, "--top-k", "0"], 2, "--top-k", ()),
    (["plan", *H100, "--dtype", "fp4"], 2, "--dtype", ()),
    (["plan", *H100, "--cost-model", "magic"], 2, "--cost-model", ()),
    (["plan", *H100, "--recompute", "some"], 2, "--recompute", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "dgx-a100", *BASE, "--dtype", "fp8"], 2, "fp8", ()),
    (["estimate", *EST[1:], "--mem-headroom", "nan"], 2, "--mem-headroom", ()),
    (["plan", *H100, "--bogus-flag"], 2, "bogus", ()),
    # names and files
    (["plan", "--model", "llama9-999b", "--cluster", "dgx-h100", *BASE], 2, "unknown model", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "dgx-h900", *BASE], 2, "unknown cluster", ()),
    (["plan", "--model", "{d}/binary.json", "--cluster", "dgx-h100", *BASE], 2, "binary", ()),
    (["plan", "--model", "{d}/latin1.json", "--cluster", "dgx-h100", *BASE], 2, "UTF-8", ()),
    (["plan", "--model", "{d}/empty.json", "--cluster", "dgx-h100", *BASE], 2, "not valid", ()),
    (["plan", "--model", "{d}/trunc.json", "--cluster", "dgx-h100", *BASE], 2, "not valid", ()),
    (["plan", "--model", "{d}/list.yaml", "--cluster", "dgx-h100", *BASE], 2, "mapping", ()),
    (["plan", "--model", "{d}/notype.json", "--cluster", "dgx-h100", *BASE], 2, "model_type", ()),
    (["plan", "--model", "{d}/bert.json", "--cluster", "dgx-h100", *BASE], 2, "not supported", ()),
    (["plan", "--model", "{d}/nan.json", "--cluster", "dgx-h100", *BASE], 2, "NaN", ()),
    (["plan", "--model", "{d}/neg.json", "--cluster", "dgx-h100", *BASE], 2, "hidden_size", ()),
    (["plan", "--model", "{d}/huge.json", "--cluster", "dgx-h100", *BASE], 2, "hidden_size", ()),
    (["plan", "--model", "{d}/heads.json", "--cluster", "dgx-h100", *BASE], 2, "num_key_value_heads", ()),
    (["plan", "--model", "{d}/confdir", "--cluster", "dgx-h100", *BASE], 2, "does not exist", ()),
    (["plan", "--model", "{d}/missing.json", "--cluster", "dgx-h100", *BASE], 2, "does not exist", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_nan_bw.yaml", *BASE], 2, "bandwidth_GBps", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_inf_lat.yaml", *BASE], 2, "latency_s", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_nan_peak.yaml", *BASE], 2, "peak_tflops", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_nan_mem.yaml", *BASE], 2, "memory_GiB", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_eff.yaml", *BASE], 2, "efficiency", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_neg_exp.yaml", *BASE], 2,
     "tensor_flops_per_exp", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_old_key.yaml", *BASE], 2,
     "replaced by grouped_gemm_half_gflop", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_bomb.yaml", *BASE], 2, "aliases", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_unknown.yaml", *BASE], 2, "unknown keys", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_gpus.yaml", *BASE], 2, "gpus", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_nogpu.yaml", *BASE], 2, "gpu_types", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_matrix.yaml", *BASE], 2, "bandwidth_GBps", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_dup.yaml", *BASE], 2, "unique", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/c_binary.yaml", *BASE], 2, "binary", ()),
    (["plan", "--model", "llama3.1-8b", "--cluster", "{d}/cluster_ok.yaml", "--nodes", "4", *BASE],
     2, "--nodes", ()),
    # outputs that cannot be written: refused before any work
    (["plan", *H100, "-o", "{d}/no/such/dir/plan.yaml"], 2, "does not exist", ("{d}/no",)),
    (["plan", *H100, "-o", "{d}/ro"], 2, "directory", ()),
    (["plan", *H100, "-o", "/proc/meshplan-plan.yaml"], 2, "cannot write", ()),
    (["plan", *H100, "--report", "{d}/nope/r.html"], 2, "does not exist", ("{d}/nope",)),
    (["simulate", "{d}/plan.yaml", "--gantt", "{d}/nodir/g.png"], 2, "does not exist", ("{d}/nodir",)),
    (["simulate", "{d}/plan.yaml", "--gantt", "{d}/g.txt"], 2, ".png", ("{d}/g.txt",)),
    (["launch", "{d}/plan.yaml", "--script", "{d}/train.py", "-o", "{d}/afile"], 2, "is a file", ()),
    # fixed degrees that cannot work: the rule is named
    (["plan", *H100, "--tp", "3"], 2, "attention heads", ()),
    (["plan", *H100, "--pp", "200"], 2, "layers", ()),
    (["plan", *H100, "--dp", "7"], 2, "--dp may be", ()),
    (["plan", *H100, "--ep", "2"], 2, "mixture-of-experts", ()),
    (["plan", "--model", "mixtral-8x7b", "--cluster", "dgx-h100", "--nodes", "2", *BASE, "--ep", "3"],
     2, "8 experts", ()),
    (["plan", *H100, "--tp", "16"], 2, "--max-tp", ()),
    (["plan", *H100, "--cp", "3"], 2, "2*cp", ()),
    (["estimate", *EST[1:7], *BASE, "--tp", "3", "--pp", "1", "--micro-batch-size", "1"], 2, "heads", ()),
    (["estimate", *EST[1:7], *BASE, "--tp", "2", "--pp", "3", "--micro-batch-size", "1"], 2, "divide", ()),
    (["estimate", *EST[1:], "--dp", "3"], 2, "--dp", ()),
    # does not fit: exit 3, still one stderr line
    (["plan", "--model", "llama3.1-405b", "--cluster", "dgx-h100", "--nodes", "1", *BASE], 3, "fits", ()),
    (["estimate", "--model", "llama3.1-70b", "--cluster", "dgx-h100", "--nodes", "1", *BASE,
      "--tp", "1", "--pp", "1", "--micro-batch-size", "1"], 3, "over by", ()),
    # plan files
    (["simulate", "{d}/missing.yaml"], 2, "does not exist", ()),
    (["simulate", "{d}/binary.json"], 2, "binary", ()),
    (["simulate", "{d}/plan_v2.yaml"], 2, "meshplan", ()),
    (["simulate", "{d}/plan_gap.yaml"], 2, "every layer", ()),
    (["simulate", "{d}/plan_node.yaml"], 2, "node_order", ()),
    (["simulate", "{d}/plan_split.yaml"], 2, "layers_per_stage", ()),
    (["simulate", "{d}/plan_tp.yaml"], 2, "tp", ()),
    (["simulate", "{d}/plan_list.yaml"], 2, "mapping", ()),
    (["launch", "{d}/plan_gap.yaml", "--script", "{d}/train.py", "-o", "{d}/out_gap"], 2,
     "every layer", ("{d}/out_gap",)),
    # launch and run
    (["launch", "{d}/plan.yaml", "--script", "{d}/train.py", "-o", "{d}/out_h1", "--hosts",
      "{d}/hosts_ghost"], 2, "not a plan node", ("{d}/out_h1",)),
    (["launch", "{d}/plan.yaml", "--script", "{d}/train.py", "-o", "{d}/out_h2", "--hosts",
      "{d}/hosts_bad"], 2, "host name", ("{d}/out_h2",)),
    (["launch", "{d}/plan.yaml", "--script", "{d}/train.py", "-o", "{d}/out_h3", "--hosts",
      "{d}/hosts_short"], 2, "one host per node", ("{d}/out_h3",)),
    (["launch", "{d}/plan.yaml", "--script", "{d}/train.py", "-o", "{d}/out_h4", "--hosts",
      "{d}/hosts_bin"], 2, "hosts file", ("{d}/out_h4",)),
    (["launch", "{d}/plan.yaml", "--script", "{d}/nothere.py", "-o", "{d}/out_s"], 2,
     "does not exist", ("{d}/out_s",)),
    (["launch", "{d}/plan.yaml", "--script", "{d}/train.py", "-o", "{d}/out_r",
      "--rdzv-endpoint", "nohostport"], 2, "HOST:PORT", ("{d}/out_r",)),
    (["launch", "{d}/plan.yaml", "--script", "{d}/train.py", "-o", "{d}/out_b", "--backend", "mpi"],
     2, "--backend", ("{d}/out_b",)),
    (["launch", "{d}/plan.yaml", "--script", "{d}/train.py", "-o", "{d}/out_r2",
      "--rdzv-endpoint", "a;b:29500"], 2, "valid host name", ("{d}/out_r2",)),
    (["run", "{d}/plan.yaml", "--script", "{d}/train.py", "-o", "{d}/run1", "--hang-k", "nan"], 2,
     "--hang-k", ("{d}/run1",)),
    (["run", "{d}/plan.yaml", "--script", "{d}/train.py", "-o", "{d}/run2", "--steps", "0"], 2,
     "--steps", ("{d}/run2",)),
    (["run", "{d}/plan.yaml", "--script", "{d}/train.py", "-o", "{d}/run3", "--poll", "inf"], 2,
     "--poll", ("{d}/run3",)),
    (["models", "extra"], 2, "extra", ()),
    (["goodput", "{d}/plan.yaml", "--mtbf-gpu-hours", "nan"], 2, "--mtbf-gpu-hours", ()),
    (["goodput", "{d}/plan.yaml", "--restart-s", "-1"], 2, "--restart-s", ()),
    (["goodput", "{d}/plan_gap.yaml"], 2, "every layer", ()),
    # hybrid (Mamba) configs that do not add up
    (["estimate", "--model", "{d}/hybrid_short.json", *H100[2:6], *EST_HYBRID], 2,
     "hybrid_override_pattern", ()),
    (["estimate", "--model", "{d}/hybrid_char.json", *H100[2:6], *EST_HYBRID], 2,
     "layer_pattern must be", ()),
    (["estimate", "--model", "{d}/hybrid_heads.json", *H100[2:6], *EST_HYBRID], 2,
     "mamba_groups", ()),
]


@pytest.mark.parametrize("args,code,words,absent", CASES,
                         ids=[f"{i:02d}-{c[0][0]}" for i, c in enumerate(CASES)])
def test_hostile_input(files: Path, args, code, words, absent):
    argv = [a.replace("{d}", str(files)) for a in args]
    got, out, err, seconds = meshplan(argv, files)
    lines = err.strip().splitlines()
    assert got == code, f"exit {got}, want {code}: {err[-600:]}"
    assert "Traceback" not in err + out
    assert len(lines) == 1, f"want one stderr line, got {len(lines)}: {err[:600]}"
    assert lines[0].startswith("error: ") and len(lines[0]) <= 300, lines[0]
    assert words.lower() in lines[0].lower(), lines[0]
    for path in absent:
        assert not Path(path.replace("{d}", str(files))).exists(), path
    assert seconds <= TIMEOUT_S, f"{seconds:.1f} s"


def test_table_is_large_enough():
    assert len(CASES) >= 60
