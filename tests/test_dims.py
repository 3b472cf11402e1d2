"""`ParallelDims` owns the degrees, the rank order and the strides; everyone else asks it.

The expected coordinates of every rank come from the owner; the planner's plan file, the
placement ILP's node grid, the heterogeneous model's (and simulator's) rank map and the
example trainer's device mesh must agree, and the cost model's collectives must run over the
owner's groups. A source scan fails if any other module spells out the rank order, a degree
tuple or a stride product.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest

from cost_models import comm, megatron
from cost_models.dims import DEGREES, MESH_ORDER, RANK_ORDER, ParallelDims
from cost_models.grid import LayoutGrid
from cost_models.hetero_model import rank_nodes
from cost_models.specs import Layout, SpecError
from planner.planfile import Plan, rank_coords
from planner.specfiles import load_cluster, load_model

ROOT = Path(__file__).resolve().parents[1]

LAYOUTS = [
    Layout(tp=2, pp=2, dp=2, cp=2, micro_batch_size=1, global_batch_size=8, seq_len=64),
    Layout(tp=4, pp=3, dp=1, cp=2, micro_batch_size=1, global_batch_size=6, seq_len=64),
    Layout(tp=1, pp=4, dp=4, cp=1, micro_batch_size=1, global_batch_size=16, seq_len=64),
    Layout(tp=8, pp=2, dp=4, cp=1, micro_batch_size=1, global_batch_size=8, seq_len=64),
]


def expected(dims: ParallelDims) -> list[dict[str, int]]:
    return [dims.coords(r) for r in range(dims.world)]


def test_owner_is_consistent_with_itself():
    dims = ParallelDims(tp=2, pp=3, dp=2, cp=2)
    grid = dims.rank_grid()
    assert dims.mesh_names == tuple(reversed(MESH_ORDER)) and grid.shape == dims.mesh_shape
    for r, c in enumerate(expected(dims)):
        assert grid[tuple(c[n] for n in dims.mesh_names)] == r
        for name in MESH_ORDER:  # one step along a dimension moves `stride` ranks
            if c[name] + 1 < dims.size(name):
                moved = {**c, name: c[name] + 1}
                assert grid[tuple(moved[n] for n in dims.mesh_names)] == r + dims.stride(name)
    assert RANK_ORDER == "-".join(MESH_ORDER) and dims.world == 24


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: "x".join(map(str, lay.dims.key())))
def test_plan_file_coordinates_follow_the_owner(lay):
    for r, c in enumerate(expected(lay.dims)):
        got = rank_coords(r, lay)
        assert {n: getattr(got, n) for n in MESH_ORDER} == c


@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: "x".join(map(str, lay.dims.key())))
def test_placement_and_simulator_rank_maps_follow_the_owner(lay):
    gpn = 4 if lay.world % 8 else 8
    nodes = lay.world // gpn
    order = tuple(reversed(range(nodes)))  # a non-trivial placement
    where = rank_nodes(lay, gpn, order)  # what hetero.stage_views / step_tasks / simulate use
    for r, c in enumerate(expected(lay.dims)):
        assert where[tuple(c[n] for n in lay.dims.mesh_names)] == order[r // gpn]
    try:
        stages, blocks = lay.dims.node_grid(gpn)
    except SpecError:
        return
    for r, c in enumerate(expected(lay.dims)):  # node rank k -> stage k // blocks (ILP grid)
        assert (r // gpn) // blocks == c["pp"] and stages == lay.pp


def test_trainer_mesh_follows_the_owner(monkeypatch):
    torch = pytest.importorskip("torch")
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    import gpt_parallel as par

    seen = {}

    def fake_mesh(device_type, shape, mesh_dim_names):
        seen["shape"], seen["names"] = tuple(shape), tuple(mesh_dim_names)
        return torch.arange(int(np.prod(shape))).view(shape)  # what init_device_mesh builds

    monkeypatch.setattr(par, "init_device_mesh", fake_mesh)
    for lay in LAYOUTS:
        mesh = par.build_mesh(lay, "cpu")
        for r, c in enumerate(expected(lay.dims)):
            assert int(mesh[tuple(c[n] for n in seen["names"])]) == r


def test_cost_model_collectives_use_the_owners_groups(monkeypatch):
    model = load_model("mixtral-8x7b")
    cluster = load_cluster("dgx-h100", 4, None)
    lay = Layout(tp=2, pp=2, dp=8, cp=1, ep=4, micro_batch_size=1, global_batch_size=64,
                 seq_len=4096, sequence_parallel=True)
    calls = set()
    real_bw, real_a2a = comm.group_bandwidth_Bps, comm.all_to_all_time

    def bw(size, stride, *rest):
        calls.add((int(np.ravel(size)[0]), int(np.ravel(stride)[0])))
        return real_bw(size, stride, *rest)

    def a2a(nbytes, size, stride, *rest):
        calls.add((int(np.ravel(size)[0]), int(np.ravel(stride)[0])))
        return real_a2a(nbytes, size, stride, *rest)

    monkeypatch.setattr(comm, "group_bandwidth_Bps", bw)
    monkeypatch.setattr(comm, "all_to_all_time", a2a)
    megatron.evaluate(model, cluster, LayoutGrid.from_layout(lay, model.num_layers))
    dims = lay.dims
    owner = {(dims.group(n).size, dims.group(n).stride) for n in ("tp", "cp", "dp_cp", "ep", "edp")}
    owner.add((2, dims.stage_size))  # the pipeline hop: two neighbouring stages
    assert calls == owner


def test_layout_and_grid_carry_every_degree():
    lay = LAYOUTS[0]
    assert set(DEGREES) <= set(Layout.__dataclass_fields__)
    assert set(DEGREES) <= set(LayoutGrid.__dataclass_fields__)
    assert lay.dims.world == lay.world == lay.tp * lay.pp * lay.dp * lay.cp
    grid = LayoutGrid.from_layout(lay, 8)
    assert grid.dims.key() == tuple(np.array([v]) for v in lay.dims.key())


def test_plan_coords_match_for_a_plan_object():
    model, cluster = load_model("tiny-gpt"), load_cluster("local-cpu", 1, 8)
    lay = Layout(tp=2, pp=2, dp=2, cp=1, micro_batch_size=1, global_batch_size=4, seq_len=64)
    plan = Plan(model, cluster, lay, tuple(n.name for n in cluster.nodes), {})
    assert [plan.coords(r).pp for r in range(8)] == [c["pp"] for c in expected(lay.dims)]


# --------------------------------------------------------------------------------------------
# nobody else spells out the rank order, a degree tuple or a stride
# --------------------------------------------------------------------------------------------

OWNER = ROOT / "cost_models" / "dims.py"
SCANNED = ("cost_models", "planner", "launcher", "profiler", "examples")
"""The product (benchmarks read case tables of published degrees; they derive dp from the
owner too, `dims.derived_dp`)."""
DEGREE = r"(?:\w+\.)?(?:tp|cp|dp|pp|ep)\b"
PATTERNS = {
    "stride or degree product": re.compile(rf"\b{DEGREE}\s*\*\s*{DEGREE}"),
    "degree tuple": re.compile(rf"\b{DEGREE}\s*,\s*{DEGREE}\s*,\s*{DEGREE}"),
    "rank order": re.compile(r"tp.cp.dp.pp|pp.dp.cp.tp"),
}


def _code(path: Path) -> str:
    """The file's code with comments and strings blanked (docstrings may explain the order)."""
    lines = path.read_text().splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    text = list("".join(lines))
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type in (tokenize.COMMENT, tokenize.STRING):
            a = starts[tok.start[0] - 1] + tok.start[1]
            b = starts[tok.end[0] - 1] + tok.end[1]
            text[a:b] = " " * (b - a)
    return "".join(text)


def test_no_module_but_the_owner_spells_out_rank_order_or_strides():
    offenders = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == OWNER:
                continue
            code = _code(path)
            for what, pattern in PATTERNS.items():
                for hit in pattern.findall(code):
                    offenders.append(f"{path.relative_to(ROOT)}: {what}: {hit}")
    assert not offenders, "\n".join(offenders)
