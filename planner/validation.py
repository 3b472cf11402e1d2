"""How far the step-time prediction has been from published runs like the one asked about.

`planner/data/validation.yaml` holds, per GPU type and model kind (dense or MoE), how many
published training runs the megatron cost model was checked against and its mean and largest
step-time error on them (|predicted / measured - 1|). `python benchmarks/validate_published.py
--write-bands` writes it from both shared files and the held-out runs;
tests/test_validation_bands.py recomputes it, so a change to the cost model that moves these
figures fails until the file is rewritten. `estimate` and `plan` print the band of their GPU
and kind (or say that none exists), and put it in their JSON as "validation".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from typing import Literal

from cost_models.specs import SpecError

from .specfiles import DATA_DIR, read_mapping

BANDS_FILE = DATA_DIR / "validation.yaml"
Kind = Literal["dense", "moe"]


@dataclass(frozen=True, slots=True)
class Band:
    """The published runs of one GPU type and model kind, as the cost model predicted them."""

    gpu: str
    """GPU type name (gpus.yaml)."""
    kind: Kind
    runs: int
    """Published runs of this GPU type and kind the model was checked against."""
    mean_error: float
    """Mean |predicted / measured - 1| of their step times (a fraction)."""
    max_error: float
    """The largest of those errors (a fraction)."""

    def line(self) -> str:
        return (f"validated on {self.runs} published {_KIND_WORD[self.kind]} run"
                f"{'s' if self.runs != 1 else ''} on {self.gpu}: step time off by "
                f"{100 * self.mean_error:.1f}% on average, {100 * self.max_error:.0f}% at worst "
                "(benchmarks/validate_published.py)")

    def to_dict(self) -> dict:
        return asdict(self)


_KIND_WORD = {"dense": "dense", "moe": "MoE"}


def kind_of(is_moe: bool) -> Kind:
    return "moe" if is_moe else "dense"


@cache
def _bands() -> dict[tuple[str, str], Band]:
    data = read_mapping(BANDS_FILE, "validation bands", shipped=True) if BANDS_FILE.exists() else {}
    return {(gpu, kind): Band(gpu, kind, int(v["runs"]), float(v["mean_error"]),
                              float(v["max_error"]))
            for gpu, kinds in (data.get("bands") or {}).items() for kind, v in kinds.items()}


def band_for(gpu: str, is_moe: bool) -> Band | None:
    """The band of a GPU type and model kind; None where no published run covers them."""
    return _bands().get((gpu, kind_of(is_moe)))


def validation_line(gpu: str, is_moe: bool) -> str:
    """The band's sentence, or one saying that nothing validates this GPU and kind."""
    band = band_for(gpu, is_moe)
    if band is not None:
        return band.line()
    return (f"not validated: no published {_KIND_WORD[kind_of(is_moe)]} run on {gpu} checks "
            "this prediction (benchmarks/validate_published.py)")


def bands_yaml(bands: list[Band]) -> str:
    """The text of validation.yaml for these bands (sorted, figures rounded to 0.1%)."""
    lines = ["# Step-time error of the megatron cost model on published training runs, per GPU",
             "# type and model kind: mean and largest |predicted / measured - 1|. Written by",
             "# `python benchmarks/validate_published.py --write-bands` (both shared files and",
             "# benchmarks/data/heldout_moe_runs.csv); tests/test_validation_bands.py checks it.",
             "bands:"]
    by_gpu: dict[str, list[Band]] = {}
    for band in sorted(bands, key=lambda b: (b.gpu, b.kind)):
        by_gpu.setdefault(band.gpu, []).append(band)
    for gpu, group in by_gpu.items():
        lines.append(f"  {gpu}:")
        for b in group:
            lines.append(f"    {b.kind}: {{runs: {b.runs}, mean_error: {b.mean_error:.3f}, "
                         f"max_error: {b.max_error:.3f}}}")
    return "\n".join(lines) + "\n"


def validation_of(cluster, is_moe: bool, cost_model: str) -> tuple[str | None, dict | None]:
    """(line for humans, dict for JSON) of a prediction on `cluster` (a ClusterSpec) by
    `cost_model`: the band of its GPU type and kind, a "not validated" note where no published
    run covers them, or (None, None) where the bands do not apply (the heterogeneous cost
    models, clusters mixing GPU types: the bands measure the megatron model on one type)."""
    if cost_model != "megatron":
        return None, None
    try:
        gpu = cluster.gpu.name
    except SpecError:  # a mix of GPU types
        return None, None
    band = band_for(gpu, is_moe)
    as_dict = band.to_dict() if band is not None else {
        "gpu": gpu, "kind": kind_of(is_moe), "runs": 0, "mean_error": None, "max_error": None}
    return validation_line(gpu, is_moe), as_dict
