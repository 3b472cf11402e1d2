"""Turn rows of ../shared/data/published_runs_calibration.csv into (model, cluster, layout,
measured step time) cases for validation and calibration.

Decisions (stated, not fitted):
- Model shapes come from the row; blanks are completed only from public configs known for
  certain (NeMo/Megatron model names -> meshplan presets; Narayanan et al. 2021 Table 1 heads).
- Software era per source: 2021 Megatron-LM runs (Narayanan, MT-NLG, BLOOM) had no sequence
  parallelism or TE overlap; MT-NLG and BLOOM used DeepSpeed ZeRO-1 (distributed optimizer);
  H100-era Megatron-Core / NeMo runs use sequence parallelism and the distributed optimizer.
- A blank micro-batch size or recompute setting means the authors tuned it: we take the
  fastest setting that fits (mbs in 1, 2, 4, 8; recompute none < selective < full).
- A blank global batch with pp = 1 (NeMo long-context table) is taken as one micro-batch per
  replica: with pp = 1 the batch size only amortises the DP reduction. Blank gbs with pp > 1
  is skipped (the bubble would be a guess).
- Skipped: rows without a GPU count or parallel degrees, and DeepSpeed ZeRO-3 rows (its
  2021 partitioned collectives are not modelled); Megatron-FSDP rows (FSDP=1) are cases.
- Measured step time: `iter_time_s` when published; else tokens/s/GPU when the notes give it
  (gbs·seq / (tokens/s/GPU · GPUs)); else FLOPs / (TFLOP/s · GPUs) with the source's own FLOP
  convention (see `source_flops`).

Run: python benchmarks/validate_published.py
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, replace
from pathlib import Path

from cost_models import flops
from cost_models.dims import derived_dp
from cost_models.specs import (
    ClusterSpec,
    Layout,
    ModelSpec,
    SpecError,
    a2a_overlap_problem,
    even_split,
)
from planner.specfiles import load_cluster, load_model

CSV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "published_runs_calibration.csv"

# Narayanan et al. 2021 Table 1: attention heads by hidden size (GPT 1.7B ... 1T).
NARAYANAN_HEADS = {2304: 24, 3072: 32, 4096: 32, 6144: 48, 8192: 64, 10240: 80, 12288: 96,
                   16384: 128, 20480: 128, 25600: 160}
# Model names in the sources -> meshplan presets (public configs).
PRESET_OF = {
    "LLAMA2-7B": "llama2-7b", "LLAMA2-13B": "llama2-13b", "LLAMA2-70B": "llama2-70b",
    "LLAMA3-8B": "llama3-8b", "LLAMA3-70B": "llama3-70b", "LLAMA3_8B": "llama3-8b",
    "LLAMA3_70B": "llama3-70b", "LLAMA3.1_405B": "llama3.1-405b", "LLAMA3-405B": "llama3.1-405b",
    "Llama 3.1 70B": "llama3.1-70b", "Llama 3.1 8B": "llama3.1-8b",
}
# NeMo GPT-3 configs (NeMo examples/nlp/language_modeling/conf/gpt3_{5b,20b,175b}.yaml).
NEMO_GPT3 = {"GPT3-5B": (24, 4096, 32), "GPT3-20B": (44, 6144, 48), "GPT3-175B": (96, 12288, 96)}


@dataclass(frozen=True, slots=True)
class Case:
    source: str
    label: str
    model: ModelSpec
    cluster: ClusterSpec
    layouts: tuple[Layout, ...]
    """Candidate layouts (several when mbs/recompute were not published)."""
    measured_step_s: float
    metric: str
    """What is compared: iter_time_s, tokens_per_s_per_gpu (from notes) or tflops_per_gpu."""
    convention: str
    """FLOP convention used to turn TFLOP/s into a step time."""
    source_flops: float


def source_family(source: str) -> str:
    for key, fam in (("Narayanan", "megatron2021"), ("MT-NLG", "deepspeed2021"),
                     ("bigscience", "deepspeed2021"), ("Korthikanti", "korthikanti"),
                     ("README images", "megatron-h100"), ("strong-scaling", "megatron-h100"),
                     ("NeMo", "nemo"), ("Megatron-Bridge", "nemo"), ("examples/llama", "nemo"),
                     ("dgxc", "nemo"), ("OPT", "opt")):
        if key in source:
            return fam
    return "other"


def _num(x: str) -> float | None:
    x = x.strip().rstrip("%")
    return float(x) if x else None


def gpt_model(name: str, layers: int, hidden: int, heads: int, vocab: int, seq: int) -> ModelSpec:
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden,
                     num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                     vocab_size=vocab, max_seq_len=seq, tied_embeddings=True, mlp_kind="gelu",
                     dropout=True)


def row_model(row: dict, family: str) -> ModelSpec | None:
    name = row["model"].strip()
    seq = int(_num(row["seq"]))
    if name in PRESET_OF:
        return load_model(PRESET_OF[name])
    if name in NEMO_GPT3:
        layers, hidden, heads = NEMO_GPT3[name]
        return gpt_model(name, layers, hidden, heads, 51200, seq)
    layers, hidden, heads, vocab = (_num(row[k]) for k in ("layers", "hidden", "heads", "vocab"))
    if heads is None and family == "megatron2021" and hidden in NARAYANAN_HEADS:
        heads = NARAYANAN_HEADS[int(hidden)]
    if "LLAMA2-7B" in name and layers:  # NeMo long-context table with a full shape
        return load_model("llama2-7b")
    if None in (layers, hidden, heads, vocab):
        return None
    return gpt_model(name, int(layers), int(hidden), int(heads), int(vocab), seq)


def row_cluster(row: dict, gpus: int) -> ClusterSpec:
    gpu = row["gpu"]
    preset = ("jean-zay-a100" if "Jean Za" in gpu else "dgx-a100" if "A100" in gpu
              else "dgx-h100" if "H100" in gpu else None)
    if preset is None:
        raise SpecError(f"no cluster preset for GPU {gpu!r}")
    if gpus < 8:  # part of one node
        return load_cluster(preset, nodes=1, gpus_per_node=gpus)
    return load_cluster(preset, nodes=gpus // 8)


def row_layouts(row: dict, family: str, model: ModelSpec, gpus: int) -> tuple[Layout, ...]:
    given = {k: int(_num(row[k]) or 1) for k in ("tp", "pp", "cp", "vp")}
    degrees = {**given, "dp": derived_dp(gpus, **given)}
    tp, dp = degrees["tp"], degrees["dp"]
    seq = int(_num(row["seq"]))
    gbs = _num(row["gbs"])
    mbs = _num(row["mbs"])
    rec = row["recompute"].lower()
    if family in ("megatron2021", "deepspeed2021"):
        rec = "full"  # these sources' FLOP formula counts full recomputation (README)
    recomputes = (["full"] if rec.startswith("full") else ["selective"] if rec.startswith("selective")
                  else ["none", "selective", "full"])
    modern = family in ("nemo", "megatron-h100", "korthikanti")
    mbs_options = [int(mbs)] if mbs else [1, 2, 4, 8]
    # Megatron-FSDP rows (Bridge perf recipes: bf16 main grads): 2 + 2 + 12 bytes per sharded
    # parameter, per-block all-gathers and reduce-scatters.
    sharded = "FSDP=1" in row["notes"]
    out = []
    for mb in mbs_options:
        g = int(gbs) if gbs else dp * mb
        for r in recomputes:
            lay = Layout(**degrees, micro_batch_size=mb,
                         global_batch_size=g, seq_len=seq, recompute=r,
                         sequence_parallel=modern and tp > 1,
                         distributed_optimizer=family != "megatron2021",
                         flash_attention=modern,
                         dtype="fp8" if "FP8" in row["gpu"] + row["notes"] else "bf16",
                         fsdp=sharded, grad_reduce_fp32=not sharded)
            try:
                lay.validate(model, gpus)
            except SpecError:
                continue
            out.append(lay)
    return tuple(out)


def source_flops(row: dict, family: str, model: ModelSpec, layout: Layout) -> tuple[float, str]:
    """FLOPs per step in the convention the source used for its TFLOP/s."""
    gbs, seq = layout.global_batch_size, layout.seq_len
    if family in ("megatron2021", "deepspeed2021"):
        return (float(flops.megatron_paper_flops(gbs, seq, model.num_layers, model.hidden_size,
                                                 model.vocab_size)),
                "96Bslh^2(1+s/6h+V/16lh) (with recompute)")
    return (float(flops.model_flops_per_step(model, gbs, seq, causal=False)),
            "model FLOPs, non-causal attention (NeMo/Megatron)")


def load_cases(path: Path = CSV) -> tuple[list[Case], list[tuple[str, str]]]:
    """(usable cases, skipped (label, reason))."""
    cases, skipped = [], []
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):
        label = f"{i + 2:>3} {row['model'].strip()[:28]} {row['num_gpus']}x{row['gpu'][:14]}"
        family = source_family(row["source"])
        gpus = _num(row["num_gpus"])
        if not gpus or not row["tp"].strip() or not row["pp"].strip():
            skipped.append((label, "GPU count or parallel degrees not published"))
            continue
        if "ZeRO-3" in row["model"]:
            skipped.append((label, "DeepSpeed ZeRO-3 (2021): its per-parameter partitioned "
                                   "collectives are not modelled (the FSDP per-block model "
                                   "predicts ~197 TFLOP/s vs the measured 44-144)"))
            continue
        if not row["gbs"].strip() and int(_num(row["pp"])) > 1:
            skipped.append((label, "global batch not published and pp > 1"))
            continue
        model = row_model(row, family)
        if model is None:
            skipped.append((label, "model shape incomplete"))
            continue
        gpus = int(gpus)
        cluster = row_cluster(row, gpus)
        layouts = row_layouts(row, family, model, gpus)
        if not layouts:
            skipped.append((label, "published layout is invalid for the model shape"))
            continue
        iter_time = _num(row["iter_time_s"])
        if iter_time:
            f, conv = source_flops(row, family, model, layouts[0])
            cases.append(Case(row["source"], label, model, cluster, layouts, iter_time,
                              "iter_time_s", "-", f))
            continue
        f, conv = source_flops(row, family, model, layouts[0])
        tokens = re.search(r"tokens/s/GPU=([0-9.]+)", row["notes"])
        if tokens:  # throughput in tokens: no FLOP convention involved
            step = layouts[0].global_batch_size * layouts[0].seq_len / (float(tokens[1]) * gpus)
            cases.append(Case(row["source"], label, model, cluster, layouts, step,
                              "tokens_per_s_per_gpu", "-", f))
            continue
        tflops = _num(row["tflops_per_gpu"])
        if not tflops:
            skipped.append((label, "neither iteration time nor TFLOP/s published"))
            continue
        cases.append(Case(row["source"], label, model, cluster, layouts,
                          f / (tflops * 1e12 * gpus), "tflops_per_gpu", conv, f))
    return cases, skipped


# --------------------------------------------------------------------------------------------
# ../shared/data/published_runs_2025_2026.csv (MoE, Blackwell, FSDP; models in models/)
# --------------------------------------------------------------------------------------------

CSV_2025 = CSV.parent / "published_runs_2025_2026.csv"
HELDOUT = Path(__file__).resolve().parent / "data" / "heldout_moe_runs.csv"
"""Runs in neither shared file (written by heldout_runs.py); nothing is fitted on them."""
MODELS_2025 = CSV.parent / "models"


H100_96GB_GiB = 95.5
"""Capacity torch sees on the 96 GB H100 of Meta's Grand Teton hosts (torchtitan's benchmark
rows), taken at the H100-SXM ratio of planner/data/gpus.yaml (79.6 GiB of 80 GB)."""
H100_96GB_HBM_GBps = 2400
"""Its HBM2e peak bandwidth, as the torchtitan benchmark document states (2.4 TB/s; the
80 GB H100-SXM preset has 3350)."""
H100_96GB_POWER_W = 500
"""Its power limit, as the document states (`GpuSpec.power_limit_W`; the preset's 700 W TDP)."""
TITAN_DEFAULT_SEQ = 8192
"""torchtitan's train_configs seq_len at the benchmark commits (rows that leave it blank)."""
BRIDGE_GRADS_NOTE = ("Megatron-Bridge perf recipes set cfg.ddp.grad_reduce_in_fp32 = False "
                     "(scripts/performance/configs/*: llama31_llm_pretrain.py "
                     "set_llama31_common_configs, qwen3, deepseek, gpt-oss): bf16 main grads")


def cluster_2025(gpu: str, gpus: int) -> ClusterSpec:
    """The system of a 2025-2026 row: DGX GB200 NVL72 racks (node = 4-GPU tray), DGX B200,
    DGX H100 (and the 96 GB H100 of Grand Teton at `H100_96GB_GiB`), DGX H200; SpecError for
    systems meshplan has no preset for."""
    preset, per_node = (("gb300-nvl72", 4) if "GB300" in gpu else ("gb200-nvl72", 4)
                        if "GB200" in gpu else ("dgx-b300", 8) if "B300" in gpu
                        else ("dgx-b200", 8) if "B200" in gpu
                        else ("dgx-h100", 8) if "H100" in gpu
                        else ("dgx-h200", 8) if "H200" in gpu else (None, 0))
    if preset is None:
        raise SpecError(f"no cluster preset for the system {gpu[:60]!r}")
    if gpus < per_node:
        cluster = load_cluster(preset, nodes=1, gpus_per_node=gpus)
    else:
        cluster = load_cluster(preset, nodes=gpus // per_node)
    if "H100 SXM 96GB" in gpu:
        cluster = with_gpu(cluster, memory_GiB=H100_96GB_GiB, hbm_bandwidth_GBps=H100_96GB_HBM_GBps,
                           power_limit_W=H100_96GB_POWER_W if "500W" in gpu else 0.0)
    return cluster


def with_gpu(cluster: ClusterSpec, **fields) -> ClusterSpec:
    """The cluster with `fields` (GpuSpec fields) replaced on every GPU type."""
    types = {k: replace(v, **fields) for k, v in cluster.gpu_types.items()}
    return replace(cluster, gpu_types=types)


def dtype_2025(text: str) -> str:
    """'mxfp8' | 'fp8' (per-tensor scaling: current scaling or torchao tensorwise) | 'bf16'."""
    text = text.lower()
    return "mxfp8" if text.startswith("mxfp8") else "fp8" if text.startswith("fp8") else "bf16"


def recomputes_2025(text: str) -> list[str]:
    """The recompute settings a row allows: the stated one, or all three when blank (tuned)."""
    text = text.lower()
    if text.startswith("none"):
        return ["none"]
    if text.startswith("selective"):
        return ["selective"]
    if text.startswith("full"):
        return ["full"]
    return ["none", "selective", "full"]


def offload_2025(notes: str) -> int:
    """Layers of activation offload a row's preset sets ('cpu_offloading_num_layers=40')."""
    found = re.search(r"cpu_offloading_num_layers=(\d+)", notes)
    return int(found.group(1)) if found else 0


def modules_2025(text: str) -> tuple[str, ...]:
    """Megatron's --recompute-modules of a 'selective:layernorm+moe_act' cell; () (Megatron's
    default, core_attn) when the cell names none."""
    _, sep, mods = text.strip().partition(":")
    return tuple(m.strip() for m in mods.split("+") if m.strip()) if sep else ()


PRESET_FACTS = Path(__file__).resolve().parent / "data" / "bridge_moe_presets.csv"
"""The Megatron-Bridge perf-preset facts of the MoE rows (benchmarks/bridge_presets.py)."""


def preset_facts(path: Path = PRESET_FACTS) -> dict[int, dict]:
    """{line of the 2025-2026 file: its preset's facts}."""
    with open(path) as fh:
        return {int(r["csv_line"]): r for r in csv.DictReader(fh)}


def _moe_settings(facts: dict | None) -> dict:
    """The expert-overlap, dispatcher and CUDA-graph settings of a MoE row: its preset's, or
    Megatron-Core's defaults (no overlap, alltoall, graphs as the notes say) where no single
    preset matches it (choosing the fastest of the unknowns would flatter the model)."""
    if facts is None:
        return {}
    impl, mods = facts["cuda_graph_impl"], facts["cuda_graph_modules"]
    return {"moe_a2a_overlap": facts["moe_a2a_overlap"] == "True",
            "moe_dispatcher": facts["dispatcher_backend"],
            "cuda_graphs": impl == "full_iteration",
            "cuda_graph_modules": tuple(mods.split("+")) if impl == "transformer_engine"
            and mods else ()}


def layouts_2025(row: dict, model: ModelSpec, gpus: int,
                 facts: dict | None = None) -> tuple[Layout, ...]:
    """The published layout of a row. Megatron-Bridge: Megatron-Core (sequence parallel with
    tp > 1, distributed optimizer or Megatron-FSDP, flash attention; etp blank = Megatron-Core's
    default tp) with bf16 main grads (`BRIDGE_GRADS_NOTE`). torchtitan: FSDP2 over every dp
    (x cp) rank, its memory conventions (`Layout.framework`), sequence parallel with tp > 1,
    seq_len `TITAN_DEFAULT_SEQ` where blank."""
    titan = "torchtitan" in row["source_url"]
    given = {k: int(_num(row[k]) or 1) for k in ("tp", "pp", "cp", "ep", "vp")}
    etp = _num(row["etp"])
    chunks = given["pp"] * given["vp"]
    split = None
    stated = re.search(r"layers per pipeline chunk: ([\d,]+)", row["notes"])
    if stated:  # the framework's own layout (Megatron-Bridge's DeepSeek-V3 table)
        split = tuple(int(n) for n in stated.group(1).split(","))
    elif chunks > model.num_layers:  # embedding and loss counted as layers in the split
        sizes = list(even_split(model.num_layers + 2, chunks))
        sizes[0], sizes[-1] = sizes[0] - 1, sizes[-1] - 1
        split = tuple(sizes)
    out, errors = [], []
    moe = _moe_settings(facts) if model.is_moe and not titan else {}
    # a blank recompute cell: the preset's when it matches the row's layout (a release-wide
    # setting may not hold at another micro-batch), else tuned
    layout_match = facts is not None and not facts["matched_by"].startswith("release family")
    cell = row["recompute"] or (facts["recompute"] if layout_match else "")
    for rec in recomputes_2025(cell):
        lay = Layout(**given, dp=derived_dp(gpus, **given), etp=int(etp) if etp else None,
                     recompute_modules=modules_2025(cell) if rec == "selective"
                     and not titan else (),
                     offload_activation_layers=offload_2025(row["notes"]) if rec == "none" else 0,
                     torch_compile=titan and "compile" in row["source_note"] + row["notes"],
                     async_tp=titan and "'async TP'" in row["source_note"],
                     micro_batch_size=int(_num(row["micro_batch_size"])),
                     global_batch_size=int(_num(row["global_batch_size"])),
                     seq_len=int(_num(row["seq_len"]) or TITAN_DEFAULT_SEQ), recompute=rec,
                     sequence_parallel=given["tp"] > 1,
                     distributed_optimizer=row["sharding"] == "megatron-distopt",
                     dtype=dtype_2025(row["dtype"]), layers_per_stage=split,
                     cuda_graphs="CUDA graphs full_iteration" in row["notes"],
                     fsdp=row["sharding"] == "fsdp", grad_reduce_fp32=titan,
                     framework="torchtitan" if titan else "megatron",
                     te_cross_entropy=not titan)  # Bridge perf recipes: TE's fused loss
        lay = replace(lay, **moe)
        if lay.moe_a2a_overlap and not layout_match and a2a_overlap_problem(
                model, "megatron", lay.ep, lay.pp, lay.vp, rec, lay.recompute_modules):
            # a release-wide fact this row's own layout cannot take: Megatron-Core refuses
            # the flag there, so the measured run went without it
            lay = replace(lay, moe_a2a_overlap=False)
        try:
            lay.validate(model, gpus)
        except SpecError as exc:
            errors.append(str(exc))
            continue
        out.append(lay)
    if not out and errors:
        raise SpecError(f"no variant of the published layout is valid: {errors[0]}")
    return tuple(out)


def presets_of(path: Path) -> dict[int, dict]:
    """The preset facts of a file in the 2025-2026 schema: PRESET_FACTS for the shared file,
    else `<stem>_presets.csv` beside it (benchmarks/bridge_presets.py --out) if there is one."""
    path = Path(path).resolve()
    if path == CSV_2025.resolve():
        return preset_facts()
    beside = path.with_name(f"{path.stem}_presets.csv")
    return preset_facts(beside) if beside.exists() else {}


def row_model_2025(row: dict) -> ModelSpec:
    """A row's model: its config in ../shared/data/models/, else the meshplan preset of that
    name (lower case: DeepSeek-V3 -> deepseek-v3); MTP off where the notes say so."""
    path = MODELS_2025 / f"{row['model']}.json"
    model = load_model(str(path) if path.exists() else row["model"].lower())
    return replace(model, mtp_layers=0) if "MTP off" in row["notes"] else model


def load_cases_2025(path: Path = CSV_2025) -> tuple[list[Case], list[tuple[str, str]]]:
    """(usable cases, skipped (label, reason)) of the 2025-2026 file (or another in its
    schema, e.g. benchmarks/data/heldout_moe_runs.csv). Step time from tokens/s/GPU:
    gbs·seq / (tokens_per_s_per_gpu · GPUs)."""
    cases, skipped = [], []
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    facts = presets_of(path)
    for i, row in enumerate(rows):
        gpus = int(_num(row["num_gpus"]))
        label = (f"{i + 2:>3} {row['model'][:16]} {gpus}x{row['gpu'].split(' ')[0][:6]} "
                 f"{dtype_2025(row['dtype'])}")
        source = "Megatron-Bridge" if "Megatron-Bridge" in row["source_url"] else "torchtitan"
        try:
            cluster = cluster_2025(row["gpu"], gpus)
        except SpecError as exc:
            skipped.append((label, str(exc)))
            continue
        model = row_model_2025(row)
        try:
            layouts = layouts_2025(row, model, gpus, facts.get(i + 2))
        except SpecError as exc:
            skipped.append((label, str(exc)))
            continue
        if not layouts:
            skipped.append((label, "published layout is invalid for the model shape"))
            continue
        lay = layouts[0]
        step = lay.global_batch_size * lay.seq_len / (float(row["tokens_per_s_per_gpu"]) * gpus)
        f = float(flops.model_flops_per_step(model, lay.global_batch_size, lay.seq_len))
        family = f"{source} {Path(model.name).stem if model.is_moe else 'dense'} {cluster.gpu.name}"
        cases.append(Case(family, label, model, cluster, layouts, step,
                          "tokens_per_s_per_gpu", "-", f))
    return cases, skipped
