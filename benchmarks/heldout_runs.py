"""Extract held-out MoE runs from the Megatron-Bridge performance archive: rows that are in
neither shared file, to judge the cost model on what it was not calibrated on.

Held out: every DeepSeek-V3 pretraining row (a MoE family absent from the shared files: MLA,
256 experts, 3 dense layers, multi-token prediction), every Nemotron 3 Nano row (a hybrid
Mamba-2 / attention / MoE family, also absent), every Kimi-K2 row (DeepSeek-V3's network at
384 experts and 64 heads, trained with Muon) and the GB300 / B300 rows of the shared
file's MoE families (systems absent from it), of the NeMo containers whose Megatron-Bridge
release is known (`bridge_presets.RELEASE`). Left out: NVFP4 rows (no such dtype here), the
26.06.01 section (its release is not stated) and rows a footnote marks as a known regression.

Source: docs/performance-summary-archive.md of NVIDIA-NeMo/Megatron-Bridge at `COMMIT`. Each
row is written in the schema of ../shared/data/published_runs_2025_2026.csv, with notes that
say where it came from and, for DeepSeek-V3:
  - MTP: on (the 26.x recipes set mtp_num_layers = 1, recipes/deepseek/deepseek_v3.py), off
    where the table says "w/o MTP";
  - layers per pipeline chunk: Megatron-Bridge's DeepSeek-V3 layout for that many chunks
    (set_deepseek_v3_pipeline_model_parallel_layout: the first chunk also holds the embedding,
    the last the MTP module and the loss).
Writes benchmarks/data/heldout_moe_runs.csv (committed); then run bridge_presets.py on it for
the preset facts and validate_published.py --csv on it for the figures.

Run: python benchmarks/heldout_runs.py --repo /path/to/Megatron-Bridge/.git
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
from pathlib import Path

from bridge_presets import RELEASE

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "heldout_moe_runs.csv"
COMMIT = "067f987df03b8355b03192d88d70f1709fedf51a"
DOC = "docs/performance-summary-archive.md"
URL = f"https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/{COMMIT}/{DOC}"
COLUMNS = ("source_url", "source_note", "model", "model_type", "gpu", "num_gpus", "dtype",
           "seq_len", "global_batch_size", "micro_batch_size", "tp", "pp", "cp", "ep", "etp",
           "vp", "sharding", "recompute", "iter_time_s", "tokens_per_s_per_gpu",
           "tflops_per_gpu", "notes")
MODELS = {"DeepSeekV3": "DeepSeek-V3", "GPT OSS 120B": "gpt-oss-120b",
          "Qwen3_30B_a3B": "Qwen3-30B-A3B", "Qwen3_235B_a22B": "Qwen3-235B-A22B",
          "Nemotron_3_Nano": "Nemotron-3-Nano-30B-A3B", "Kimi_K2": "Kimi-K2"}
ABSENT_FAMILIES = ("DeepSeek-V3", "Nemotron-3-Nano-30B-A3B", "Kimi-K2")
"""Families absent from the shared files: every system of theirs is held out."""
SYSTEMS = {"DGX-GB300": "GB300 (DGX-GB300 NVL72)", "DGX-B300": "B300 (DGX-B300)",
           "DGX-GB200": "GB200 (DGX-GB200 NVL72)", "DGX-B200": "B200 (DGX-B200)",
           "DGX-H100": "H100-SXM 80GB (DGX-H100)"}
HELD_SYSTEMS = ("DGX-GB300", "DGX-B300")
"""Systems held out for the families the shared file has."""
DTYPES = {"BF16": "bf16", "MXFP8": "mxfp8", "FP8-MX": "mxfp8", "FP8-CS": "fp8", "FP8": "fp8"}
DSV3_CHUNKS = {4: (16, 16, 16, 13), 8: (8,) * 7 + (5,), 16: (4,) * 15 + (1,)}
"""Megatron-Bridge's DeepSeek-V3 layers per pipeline chunk by chunk count (pp x vp); its
Kimi-K2 recipe uses the same (`_get_kimi_k2_pipeline_layout`, recipes/kimi/kimi_k2.py)."""


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text: str):
    """(container, heading, {column: cell}) of every pretraining table row."""
    container, heading, header, pretrain = None, "", None, False
    for line in text.splitlines():
        if m := re.match(r"## ([\d.]+) NeMo Container", line):
            container, pretrain = m.group(1), False
        elif line.startswith("### "):
            pretrain = "Pre-Training" in line
        elif line.startswith("#### "):
            heading, header = line[5:].strip(), None
        elif line.startswith("|") and pretrain and container:
            cells = _cells(line)
            if header is None:
                header = cells
            elif not set(line) <= set("|-: \n"):
                yield container, heading, dict(zip(header, cells, strict=False))
        else:
            header = None if not line.startswith("|") else header


def _first(cell: str) -> str:
    """'31508 (29789)' -> '31508' (the table's parenthesised value is another granularity)."""
    return cell.split("(")[0].strip()


def row_of(container: str, heading: str, cells: dict) -> dict | None:
    name = cells.get("Model") or heading.removeprefix("Model:").strip()
    system = cells.get("System") or heading.removeprefix("System:").strip()
    base = re.sub(r"\s*\(.*\)", "", name).strip()
    model, gpu = MODELS.get(base), SYSTEMS.get(system)
    dtype = DTYPES.get(_first(cells.get("Precision", "")))
    if (model is None or gpu is None or dtype is None or container not in RELEASE
            or "^" in "".join(cells.values())):
        return None
    if model not in ABSENT_FAMILIES and system not in HELD_SYSTEMS:
        return None  # in the shared file's territory
    num = {k: _first(cells[k]) for k in ("TP", "PP", "CP", "VP", "EP", "GBS", "MBS")}
    vp = "" if num["VP"] in ("n/a", "1") else num["VP"]
    notes = [f"NeMo container {container} section; Megatron-Bridge perf recipes; synthetic data"]
    if model == "Kimi-K2":
        notes.append("Muon optimizer (table note; meshplan prices Adam's step)")
    if model in ("DeepSeek-V3", "Kimi-K2"):
        if model == "DeepSeek-V3":
            mtp = "w/o MTP" not in name
            notes.append("MTP on (recipe mtp_num_layers = 1)" if mtp
                         else "MTP off (table: w/o MTP)")
        chunks = int(num["PP"]) * int(vp or 1)
        if chunks in DSV3_CHUNKS:
            notes.append("layers per pipeline chunk: "
                         + ",".join(map(str, DSV3_CHUNKS[chunks])))
    if int(_first(cells.get("FSDP", "0")) or 0):
        return None  # no held-out FSDP MoE row exists; keep the schema simple
    return dict(source_url=URL, source_note=f"Megatron-Bridge {DOC} @ {COMMIT[:10]}, {container} "
                f"NeMo Container, Pre-Training, {heading}", model=model, model_type="moe",
                gpu=gpu, num_gpus=cells["#-GPUs"], dtype=dtype, seq_len=cells["Sequence Length"],
                global_batch_size=num["GBS"], micro_batch_size=num["MBS"], tp=num["TP"],
                pp=num["PP"], cp=num["CP"], ep=num["EP"], etp="", vp=vp,
                sharding="megatron-distopt", recompute="", iter_time_s="",
                tokens_per_s_per_gpu=_first(cells["Tokens / sec / GPU"]),
                tflops_per_gpu=_first(cells["Model TFLOP / sec / GPU"]), notes="; ".join(notes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="a Megatron-Bridge git directory")
    args = ap.parse_args()
    text = subprocess.run(["git", "--git-dir", args.repo, "show", f"{COMMIT}:{DOC}"],
                          capture_output=True, text=True, check=True).stdout
    rows = [r for c, h, cells in tables(text) if (r := row_of(c, h, cells)) is not None]
    tmp = OUT.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(OUT)
    print(f"wrote {OUT} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
