"""Extract the Megatron-Bridge perf-preset facts of the MoE rows of the 2025-2026 file.

The published table gives each run's layout; the preset Megatron-Bridge ran it with
(scripts/performance/configs/<family>/*workload_base_configs.py at the release the NeMo
container shipped) also sets what the table leaves out and the cost model needs: the expert
all-to-all overlap (`moe_a2a_overlap` -> Megatron --overlap-moe-expert-parallel-comm), the CUDA
graph implementation and modules, the token dispatcher backend, and its recompute (used
where the table states none). A row's preset is the one
its notes name, else the only facts shared by every preset at that release whose layout
(tp, pp, cp, ep, vp, micro-batch, and global batch from 26.02 on) matches the row, else the
facts every preset of the row's model, GPU and precision at that release shares.

Writes benchmarks/data/bridge_moe_presets.csv (committed: the tests and the validation read
it; this script needs a Megatron-Bridge clone and is rerun only to refresh it). With --csv
and --out it does the same for another file of that schema (the held-out runs of
benchmarks/heldout_runs.py -> benchmarks/data/heldout_moe_runs_presets.csv).

Run: python benchmarks/bridge_presets.py --repo /path/to/Megatron-Bridge/.git [--csv F --out F]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import re
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSV_2025 = HERE.parent.parent / "shared" / "data" / "published_runs_2025_2026.csv"
OUT = HERE / "data" / "bridge_moe_presets.csv"
RELEASE = {"25.11": "v0.2.2", "26.02": "v0.3.1", "26.02.01": "v0.3.1", "26.04": "v0.4.2",
           "26.04.01": "v0.4.2", "26.06": "v0.5.1"}
"""NeMo container of a table section -> the Megatron-Bridge release it ships."""
FAMILY = {"gpt-oss-120b": ("gpt_oss", "GPT_OSS_120B"), "Qwen3-30B-A3B": ("qwen", "QWEN3_30B_A3B"),
          "Qwen3-235B-A22B": ("qwen", "QWEN3_235B_A22B"), "DeepSeek-V3": ("deepseek", "DEEPSEEK_V3"),
          "Nemotron-3-Nano-30B-A3B": ("nemotronh", "NEMOTRON_3_NANO"), "Kimi-K2": ("kimi", "KIMI_K2")}
GPUS = ("GB300", "GB200", "B300", "B200", "H100")
"""Preset name parts of the systems (GB before B: "B200" is in "GB200")."""
COLUMNS = ("csv_line", "model", "gpu", "container", "release", "preset", "matched_by",
           "moe_a2a_overlap", "cuda_graph_impl", "cuda_graph_modules", "dispatcher_backend",
           "recompute")


def _show(repo: str, tag: str, path: str) -> str:
    out = subprocess.run(["git", "--git-dir", repo, "show", f"{tag}:{path}"],
                         capture_output=True, text=True)
    return out.stdout


def presets(repo: str, tag: str, family: str) -> dict[str, dict]:
    """Every MoE pretrain preset of one release, as {name: fields}."""
    utils = _show(repo, tag, "scripts/performance/utils/utils.py")
    cls = re.search(r"@dataclass[^\n]*\nclass WorkloadBaseConfig:.*?(?=\n\S)", utils, re.S)
    ns: dict = {"dataclass": dataclass, "field": field}
    exec("from typing import *\n" + cls.group(0), ns)  # noqa: S102 - the release's dataclass
    mod = types.ModuleType("utils.utils")
    mod.WorkloadBaseConfig = ns["WorkloadBaseConfig"]
    sys.modules["utils"], sys.modules["utils.utils"] = types.ModuleType("utils"), mod
    dirname, stem = ("qwen3", "workload_base_configs.py") if family == "qwen" and tag == "v0.2.2" \
        else (family, "workload_base_configs.py" if tag == "v0.2.2"
              else f"{family.replace('qwen', 'qwen3')}_workload_base_configs.py")
    if family == "nemotronh":  # Nemotron 3's presets: their own file, renamed after v0.3.1
        stem = "nemotron_3_nano_workload_base_configs.py" if tag == "v0.3.1" \
            else "nemotron_3_workload_base_configs.py"
    source = _show(repo, tag, f"scripts/performance/configs/{dirname}/{stem}")
    scope: dict = {}
    exec(source, scope)  # noqa: S102 - a pinned release's data file
    return {k: {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
            for k, v in scope.items() if k.isupper() and dataclasses.is_dataclass(v)}


def facts(cfg: dict) -> tuple:
    mods = cfg.get("cuda_graph_scope") or []
    rec = cfg.get("recompute_modules")
    recompute = ("full" if cfg.get("recompute_num_layers") else
                 "selective:" + "+".join(rec) if rec else "none")
    return (bool(cfg.get("moe_a2a_overlap")), cfg.get("cuda_graph_impl") or "none",
            "+".join(mods if isinstance(mods, list) else [mods]),
            cfg.get("moe_flex_dispatcher_backend") or "alltoall", recompute)


def _layout_matches(cfg: dict, row: dict, with_gbs: bool) -> bool:
    want = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
            "context_parallel_size": "cp", "expert_model_parallel_size": "ep",
            "micro_batch_size": "micro_batch_size"}
    if with_gbs:
        want["global_batch_size"] = "global_batch_size"
    if any(int(cfg[k] or 1) != int(row[v] or 1) for k, v in want.items()):
        return False
    return int(cfg.get("virtual_pipeline_model_parallel_size") or 1) == int(row["vp"] or 1)


def row_facts(repo: str, row: dict, cache: dict) -> tuple[str, str, tuple] | None:
    container = re.search(r"([\d.]+) NeMo Container", row["source_note"]).group(1)
    tag = RELEASE[container]
    family, prefix = FAMILY[row["model"]]
    if (tag, family) not in cache:
        cache[tag, family] = presets(repo, tag, family)
    table = cache[tag, family]
    named = re.search(r"perf preset (\w+) in scripts/performance/configs at tag (v[\d.]+)",
                      row["notes"])
    if named and named.group(2) == tag and named.group(1) in table:
        return tag, named.group(1), facts(table[named.group(1)])
    gpu = next(name for name in GPUS if name in row["gpu"])
    dtype = row["dtype"].lower()
    prec = "FP8_MX" if dtype.startswith("mxfp8") else "FP8_CS" if dtype.startswith("fp8") \
        else "BF16"
    names = [k for k in table if k.startswith(prefix) and f"_{gpu}_" in k
             and (prec in k or (tag == "v0.2.2" and "BF16" in k and prec == "FP8_MX"))]
    hits = [k for k in names if _layout_matches(table[k], row, tag != "v0.2.2")]
    found = {facts(table[k]) for k in hits}
    if len(found) == 1:
        return tag, "|".join(sorted(hits)), found.pop()
    family_wide = {facts(table[k]) for k in names}  # every preset of the model/GPU/precision
    if len(family_wide) == 1:
        return tag, "family:" + "|".join(sorted(names)), family_wide.pop()
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="a Megatron-Bridge git directory")
    ap.add_argument("--csv", type=Path, default=CSV_2025, help="runs in the 2025-2026 schema")
    ap.add_argument("--out", type=Path, default=OUT, help="where the facts go")
    args = ap.parse_args()
    with open(args.csv) as fh:
        rows = list(csv.DictReader(fh))
    out, cache = [], {}
    for i, row in enumerate(rows):
        if row["model_type"] != "moe" or "Megatron-Bridge" not in row["source_url"]:
            continue
        got = row_facts(args.repo, row, cache)
        container = re.search(r"([\d.]+) NeMo Container", row["source_note"]).group(1)
        if got is None:
            print(f"line {i + 2}: no single matching preset at {RELEASE[container]}")
            continue
        tag, preset, (overlap, impl, mods, backend, recompute) = got
        how = ("release family (no layout match; all its presets agree)"
               if preset.startswith("family:") else "named in notes"
               if "|" not in preset and preset in row["notes"] else "layout match")
        preset = preset.removeprefix("family:")
        out.append(dict(zip(COLUMNS, (i + 2, row["model"], row["gpu"].split(" ")[0], container,
                                      tag, preset, how, overlap, impl, mods, backend,
                                      recompute),
                            strict=True)))
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(out)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({len(out)} rows)")


if __name__ == "__main__":
    main()
