"""`meshplan plan --report plan.html`: one self-contained HTML page about the plan.

The page holds the ranked table, the winner's step-time and memory breakdowns (bar charts),
the Gantt chart of its simulated step, and its placement: which node runs which pipeline
stage and replica block, with the links the plan uses coloured by their bandwidth. Charts are
matplotlib PNGs embedded as base64 data URIs, styles are inline: the file opens anywhere,
offline. matplotlib is imported only when a report is written.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from pathlib import Path

import numpy as np

from cost_models import hetero_model, step_tasks
from cost_models.simulator import SimResult, simulate_step
from cost_models.specs import COMM_FIELDS, SpecError

from .fileio import write_atomic
from .hetero_search import plan_node_indices, plan_step_tasks
from .planfile import Plan
from .report import layout_label

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;font-size:13px} table{border-collapse:collapse;font-size:13px}
th,td{padding:4px 9px;border-bottom:1px solid #eee;text-align:right} th{background:#f4f6f8}
td.l,th.l{text-align:left} tr.win td{background:#eef7ee;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:6px 0}
.row{display:flex;gap:16px;flex-wrap:wrap} .row img{max-width:560px}
"""


def write_report(path: str | Path, plans: list[Plan], search_result) -> Path:
    """Write the report of `plans` (best first) to `path` atomically; SpecError when there is
    nothing to report or the file cannot be written. `search_result` is the SearchResult or
    the HeteroSearch the plans came from (counts, solver, placement sources)."""
    if not plans:
        raise SpecError("no plan to report: nothing fits; see the suggestions above")
    import matplotlib

    matplotlib.use("Agg")
    best = plans[0]
    sim, order = simulate_plan(best)
    sections = [
        _header(best, search_result),
        _ranked_table(plans),
        "<h2>Winner: where the time and memory go</h2><div class='row'>"
        f"{_img(_time_chart(best), 'step time breakdown')}{_img(_memory_chart(best), 'memory breakdown')}</div>",
        f"<h2>Simulated step (Gantt)</h2><p class='sub'>event simulation of the slowest replica: "
        f"{sim.step_time_s:.3f} s simulated vs {best.estimate.get('step_time_s', float('nan')):.3f} s "
        f"analytic</p>{_img(_gantt_png(sim), 'gantt chart')}",
        "<h2>Placement</h2><p class='sub'>which node runs which pipeline stage and replica block; "
        "lines: the pipeline hops (left to right) and DP ring links (top to bottom) the plan uses, "
        f"coloured by achieved bandwidth</p>{_img(_placement_chart(best, order), 'placement')}"
        f"{_placement_table(best, order)}",
    ]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>meshplan plan report</title>"
            f"<style>{CSS}</style></head><body>{''.join(sections)}</body></html>\n")
    try:
        write_atomic(path, page)
    except OSError as exc:
        raise SpecError(f"cannot write the report to {path}: {exc.strerror}; choose another "
                        "--report path") from None
    return Path(path)


# --------------------------------------------------------------------------------------------
# simulation of the winner
# --------------------------------------------------------------------------------------------


def simulate_plan(plan: Plan) -> tuple[SimResult, tuple[int, ...]]:
    """Simulate the plan's step with the cost model it was ranked by; (result, node order)."""
    order = plan_node_indices(plan)
    if plan.estimate.get("cost_model", "megatron") in hetero_model.STYLES:
        return simulate_step(plan_step_tasks(plan), plan.layout.schedule), order
    return simulate_step(step_tasks.uniform(plan.model, plan.cluster, plan.layout),
                         plan.layout.schedule), order


# --------------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------------


def _esc(value) -> str:
    return html.escape(str(value))


def _header(best: Plan, search_result) -> str:
    res = getattr(search_result, "result", search_result)
    c = best.cluster
    gpus = ", ".join(f"{sum(n.gpus for n in c.nodes if n.gpu == g)} x {g}"
                     for g in sorted({n.gpu for n in c.nodes}))
    lay = best.layout
    est = best.estimate
    line = (f"{_esc(best.model.name)} on {_esc(c.name)}: {gpus} in {c.num_nodes} nodes; "
            f"sequence {lay.seq_len}, global batch {lay.global_batch_size}, {lay.dtype}; "
            f"cost model {_esc(est.get('cost_model', 'megatron'))}")
    stats = (f"searched {res.valid:,} valid layouts ({res.feasible:,} fit"
             f"{res.skipped_note(', ')}) in "
             f"{res.seconds:.2f} s; "
             f"solver {_esc(res.solver)}")
    return (f"<h1>meshplan plan: {_esc(layout_label(lay))}</h1><p class='sub'>{line}</p>"
            f"<p class='sub'>{stats}. Step {est.get('step_time_s', 0):.3f} s, "
            f"{est.get('tokens_per_s', 0):,.0f} tokens/s, MFU {100 * est.get('mfu', 0):.1f}% "
            "(model FLOPs / dense peak).</p>")


def _ranked_table(plans: list[Plan]) -> str:
    head = ("<tr><th>#</th><th class='l'>layout</th><th>step s</th><th>tokens/s</th><th>MFU</th>"
            "<th>GiB/GPU</th><th>bubble</th><th>comm</th><th class='l'>layers per stage</th></tr>")
    rows = []
    for i, p in enumerate(plans, 1):
        e, b = p.estimate, p.estimate.get("breakdown", {})
        step = e.get("step_time_s", float("nan"))
        comm = sum(b.get(k, 0.0) for k in COMM_FIELDS)  # as the CLI's column, EP included
        split = " ".join(str(n) for n in p.layout.stage_layers(p.model.num_layers))
        rows.append(
            f"<tr class='{'win' if i == 1 else ''}'><td>{i}</td><td class='l'>{_esc(layout_label(p.layout))}</td>"
            f"<td>{step:.3f}</td><td>{e.get('tokens_per_s', 0):,.0f}</td>"
            f"<td>{100 * e.get('mfu', 0):.1f}%</td><td>{e.get('memory', {}).get('peak_GiB', 0):.1f}</td>"
            f"<td>{100 * b.get('pp_bubble_s', 0) / step:.1f}%</td><td>{100 * comm / step:.1f}%</td>"
            f"<td class='l'>{_esc(split)}</td></tr>")
    return f"<h2>Ranked layouts</h2><table>{head}{''.join(rows)}</table>"


def _placement_table(plan: Plan, order: tuple[int, ...]) -> str:
    where = hetero_model.rank_nodes(plan.layout, plan.gpus_per_node, order)
    rows = []
    for k, i in enumerate(order):
        node = plan.cluster.nodes[i]
        stages = sorted({int(s) for s in np.argwhere(where == i)[:, 0]})
        reps = sorted({int(r) for r in np.argwhere(where == i)[:, 1]})
        rows.append(f"<tr><td>{k}</td><td class='l'>{_esc(node.name)}</td><td class='l'>{_esc(node.gpu)}</td>"
                    f"<td class='l'>{_esc(node.nic)}</td><td class='l'>{_span(stages)}</td>"
                    f"<td class='l'>{_span(reps)}</td></tr>")
    head = ("<tr><th>node rank</th><th class='l'>node</th><th class='l'>GPU</th><th class='l'>NIC</th>"
            "<th class='l'>pipeline stages</th><th class='l'>DP replicas</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{_esc(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


# --------------------------------------------------------------------------------------------
# charts (PNG bytes)
# --------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _time_chart(plan: Plan) -> bytes:
    from matplotlib import pyplot as plt

    parts = {k.removesuffix("_s").replace("_", " "): v
             for k, v in plan.estimate.get("breakdown", {}).items()}
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    names = list(parts)[::-1]
    ax.barh(names, [parts[n] for n in names], color="#3b75af")
    for y, n in enumerate(names):
        ax.text(parts[n], y, f" {parts[n]:.3f}", va="center", fontsize=8)
    ax.set_xlabel("seconds per step (critical path)")
    ax.set_title(f"step time {plan.estimate.get('step_time_s', 0):.3f} s", fontsize=10, loc="left")
    ax.margins(x=0.2)
    return _png(fig)


def _memory_chart(plan: Plan) -> bytes:
    from matplotlib import pyplot as plt

    mem = {k.removesuffix("_GiB"): v for k, v in plan.estimate.get("memory", {}).items()
           if k != "peak_GiB"}
    cap = plan.estimate.get("capacity_GiB")
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    names = list(mem)[::-1]
    ax.barh(names, [mem[n] for n in names], color="#e5862d")
    for y, n in enumerate(names):
        ax.text(mem[n], y, f" {mem[n]:.1f}", va="center", fontsize=8)
    peak = plan.estimate.get("memory", {}).get("peak_GiB", 0.0)
    title = f"peak {peak:.1f} GiB per GPU (most loaded stage)"
    if cap:
        title += f" of {cap:.1f} GiB usable"
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("GiB")
    ax.margins(x=0.2)
    return _png(fig)


def _gantt_png(sim: SimResult) -> bytes:
    from .gantt import render_gantt

    with tempfile.TemporaryDirectory() as tmp:
        path = render_gantt(sim, Path(tmp) / "gantt.png")
        return path.read_bytes()


def _link_colour_limits(slowest_GBps: float, fastest_GBps: float) -> tuple[float, float]:
    """Colour-scale limits for link speeds: the cluster's slowest (red) to fastest (green)
    pair; when every pair is as fast (within 1%), the scale runs from 0 so the links show
    green, not "slow" red."""
    if fastest_GBps - slowest_GBps <= 0.01 * fastest_GBps:
        return 0.0, max(fastest_GBps, 1e-9)
    return slowest_GBps, fastest_GBps


def _placement_chart(plan: Plan, order: tuple[int, ...]) -> bytes:
    """Node-rank grid (columns: pipeline stages, rows: replica blocks), node boxes coloured by
    GPU type, the pipeline hops and the DP ring links of each stage coloured by GB/s."""
    from matplotlib import pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.ticker import FormatStrFormatter

    style = plan.estimate.get("cost_model", "megatron")
    fab = hetero_model.fabric(plan.cluster, style if style in hetero_model.STYLES else "pipette")
    cells = _cells(plan, order)  # (node index, column, row)
    cols = max(c for _, c, _ in cells) + 1
    rows = max(r for _, _, r in cells) + 1
    pos = {n: (c, -r) for n, c, r in cells}
    segments, speeds = [], []
    for (n, _, _), (m, _, _) in _pairs(cells):
        segments.append([pos[n], pos[m]])
        speeds.append(fab.bw_Bps[n, m] / 1e9)
    fig, ax = plt.subplots(figsize=(min(14, 1.6 + 1.5 * cols), min(12, 1.4 + 0.7 * rows)))
    if segments:
        off = ~np.eye(fab.num_nodes, dtype=bool)
        span = (fab.bw_Bps[off].min() / 1e9, fab.bw_Bps[off].max() / 1e9) if off.any() else (0, 1)
        # the scale spans every node pair of the cluster: red is its slowest link, not the plan's
        lines = LineCollection(segments, cmap="RdYlGn", linewidths=3, zorder=1)
        lines.set_array(np.array(speeds))
        lines.set_clim(*_link_colour_limits(min(span[0], min(speeds)), max(span[1], max(speeds))))
        ax.add_collection(lines)
        bar = fig.colorbar(lines, ax=ax, label="link GB/s (achieved, per GPU)", shrink=0.8)
        bar.formatter = FormatStrFormatter("%.3g")  # plain GB/s, never an offset like 1e-10+4.5e1
        bar.update_ticks()
    gpu_colours = dict(zip(sorted({n.gpu for n in plan.cluster.nodes}),
                           ("#cfe2f3", "#f9dfc4", "#d9ead3", "#ead1dc"), strict=False))
    for n, (x, y) in pos.items():
        node = plan.cluster.nodes[n]
        ax.text(x, y, f"{node.name}\n{node.gpu}\n{node.nic}", ha="center", va="center", fontsize=7,
                zorder=2, bbox=dict(boxstyle="round", fc=gpu_colours.get(node.gpu, "#eee"), ec="#555"))
    ax.set_xticks(range(cols), [f"stage {c}" if cols == plan.layout.pp else f"node rank {c}"
                                for c in range(cols)], fontsize=8)
    ax.set_yticks([-r for r in range(rows)], [f"block {r}" for r in range(rows)], fontsize=8)
    ax.set_xlim(-0.6, cols - 0.4)
    ax.set_ylim(-rows + 0.4, 0.6)
    return _png(fig)


def _cells(plan: Plan, order: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(node, column, row) per node rank: the stage x block grid when every node holds one
    stage, else one column per node rank."""
    lay = plan.layout
    per_stage = lay.dims.stage_size
    gpn = plan.gpus_per_node
    if per_stage % gpn == 0:
        blocks = per_stage // gpn
        return [(n, k // blocks, k % blocks) for k, n in enumerate(order)]
    return [(n, k, 0) for k, n in enumerate(order)]


def _pairs(cells):
    """Links drawn: next block in the same column (DP ring) and same block in the next column
    (pipeline hop)."""
    at = {(c, r): (n, c, r) for n, c, r in cells}
    out = []
    for n, c, r in cells:
        for key in ((c, r + 1), (c + 1, r)):
            if key in at:
                out.append(((n, c, r), at[key]))
    return out
