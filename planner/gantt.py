"""Gantt chart of a simulated training step (`meshplan simulate --gantt out.png`).

One row per pipeline rank: a compute lane (forward, backward, optimizer; shade = model chunk)
and a thin network lane under it (activation/gradient sends, data-parallel reduction).
matplotlib is imported inside `render_gantt` so that planning never imports it.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from cost_models.simulator import SimResult
from cost_models.specs import SpecError

COLOURS = {"fwd": "#3b75af", "bwd": "#e5862d", "opt": "#c03d3e", "p2p": "#7f7f7f", "dp": "#8c5fb6"}
LABELS = {"fwd": "forward", "bwd": "backward (incl. recompute)", "opt": "optimizer",
          "p2p": "p2p send", "dp": "DP grad reduction"}
COMPUTE_H, NET_H = 0.62, 0.18  # lane heights, in row units (rows are 1 apart)
MAX_LABELS = 4000  # beyond this many fitting bars, numbers are skipped (unreadable anyway)


def _time_unit(step_s: float) -> tuple[str, float]:
    """Axis unit and its scale: ms below 2 s, else s."""
    return ("ms", 1e3) if step_s < 2.0 else ("s", 1.0)


def _shade(hex_colour: str, chunk: int, vp: int) -> tuple[float, ...]:
    """Later chunks lighter (mixed towards white), so interleaved chunks stay apart."""
    rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    mix = 0.55 * chunk / max(vp - 1, 1) if chunk >= 0 else 0.0
    return tuple(c + (1 - c) * mix for c in rgb)


def render_gantt(result: SimResult, path: str | Path, title: str = "") -> Path:
    """Draw `result` as a PNG at `path` (written atomically) and return the path.

    Raises SpecError if the file cannot be written (missing permission, a directory...).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    unit, scale = _time_unit(result.step_time_s)
    width_in = 14.0
    fig, ax = plt.subplots(figsize=(width_in, 1.2 + 0.55 * result.pp), dpi=110)
    try:
        px_per_unit = width_in * 110 * 0.9 / (result.step_time_s * scale)  # axes ~90% wide
        _draw_bars(ax, result, scale, px_per_unit)
        _draw_numbers(ax, result, scale, px_per_unit)
        ax.set_xlim(0, result.step_time_s * scale * 1.005)
        ax.set_ylim(result.pp - 0.5 + 0.1, -0.6)  # rank 0 on top
        ax.set_yticks(range(result.pp), [f"pp {r}" for r in range(result.pp)])
        ax.set_xlabel(f"time ({unit})")
        ax.grid(axis="x", alpha=0.3)
        head = title or f"{result.schedule} schedule"
        shading = ", lighter = later model chunk" if result.vp > 1 else ""
        ax.set_title(f"{head}: pp={result.pp} vp={result.vp} m={result.num_microbatches}, "
                     f"step {result.step_time_s * scale:.4g} {unit}, "
                     f"bubble {100 * result.bubble_fraction:.1f}%{shading}", fontsize=10, loc="left")
        kinds = [k for k in COLOURS if any(e.kind == k for e in result.events)]
        fig.legend(handles=[Patch(color=COLOURS[k], label=LABELS[k]) for k in kinds],
                   loc="lower center", ncol=len(kinds), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))  # 0.3 in for the legend
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    return _write_bytes(Path(path), buffer.getvalue())


def _draw_bars(ax, result: SimResult, scale: float, px_per_unit: float) -> None:
    """broken_barh per (rank, kind, chunk): thousands of bars stay fast. White separators
    only where bars are a few pixels wide, else they would wash the colours out."""
    widths = sorted(e.duration_s for e in result.events if e.kind in ("fwd", "bwd"))
    separate = bool(widths) and widths[len(widths) // 2] * scale * px_per_unit >= 5
    groups: dict[tuple[int, str, int], list[tuple[float, float]]] = {}
    for e in result.events:
        groups.setdefault((e.rank, e.kind, e.chunk), []).append((e.start_s * scale, e.duration_s * scale))
    for (rank, kind, chunk), spans in groups.items():
        if kind in ("p2p", "dp"):
            y, h = rank + COMPUTE_H / 2 + 0.04, NET_H
        else:
            y, h = rank - COMPUTE_H / 2, COMPUTE_H
        ax.broken_barh(spans, (y, h), facecolors=[_shade(COLOURS[kind], chunk, result.vp)],
                       edgecolor="white" if separate and kind in ("fwd", "bwd") else "none",
                       linewidth=0.4)


def _draw_numbers(ax, result: SimResult, scale: float, px_per_unit: float) -> None:
    """Micro-batch numbers on compute bars wide enough to hold them (~6 px per digit)."""
    fitting = [e for e in result.events if e.kind in ("fwd", "bwd")
               and e.duration_s * scale * px_per_unit >= 6.5 * len(str(e.microbatch)) + 2]
    if len(fitting) > MAX_LABELS:
        return
    for e in fitting:
        ax.text((e.start_s + e.end_s) / 2 * scale, e.rank, str(e.microbatch), ha="center",
                va="center", fontsize=7, color="white" if e.chunk <= 0 else "black")


def _write_bytes(path: Path, data: bytes) -> Path:
    """Temporary file in the target directory, then rename: never a half-written chart."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise SpecError(f"cannot write the Gantt chart to {path}: {exc.strerror}; "
                        "choose a writable --gantt path") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise SpecError(f"cannot write the Gantt chart to {path}: {exc.strerror}; "
                        "choose a writable --gantt path") from None
    return path
