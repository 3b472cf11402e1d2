"""Why fixed degrees (`plan --tp 3`, `--ep 2` on a dense model...) leave no valid layout.

One source of truth for the rules: the reason is the `SpecError` that `Layout.validate` (the
check `estimate` runs) raises for a layout with that degree, and the values that would work
are those the search's own generator yields once that degree is freed.

    reason = explain_fixed(model, cluster, seq_len, gbs, space)   # None: each degree is fine
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cost_models.specs import ClusterSpec, Layout, ModelSpec, SpecError

FIXED_AXES = ("tp", "pp", "cp", "dp", "ep", "etp", "vp", "micro_batch_size")
"""SearchSpace fields a user can fix, with the LayoutGrid/Layout field of the same name."""

_FLAG = {"micro_batch_size": "mbs"}
MAX_WITNESSES = 200
"""Valid layouts (the degree freed) tried with the fixed value to find the rule it breaks."""


def explain_fixed(model: ModelSpec, cluster: ClusterSpec, seq_len: int, global_batch_size: int,
                  space) -> str | None:
    """The first fixed degree that no valid layout can have: the rule it breaks and the
    values that would work with the other options as given. None when every fixed degree is
    possible on its own (then only their combination fails)."""
    from .search import generate  # planner.search imports this module's caller

    world, gpn = cluster.world_size, cluster.gpus_per_node
    for axis in FIXED_AXES:
        value = getattr(space, axis)
        if value is None:
            continue
        grid = generate(model, world, gpn, seq_len, global_batch_size,
                        replace(space, **{axis: None}))
        valid = sorted({int(v) for v in getattr(grid, axis)})
        if value in valid:
            continue
        flag = _FLAG.get(axis, axis)
        witnesses = [grid.layout(int(i)) for i in _simplest(grid, axis)[:MAX_WITNESSES]]
        rule = _broken_rule(model, world, gpn, space, axis, value, witnesses)
        works = (f"with the other options as given, --{flag} may be {_few(valid)}" if valid else
                 "no value works with the other options as given; relax them too")
        return f"--{flag} {value} leaves no valid layout: {rule}; {works}"
    return None


def _broken_rule(model: ModelSpec, world: int, gpus_per_node: int, space, axis: str, value: int,
                 witnesses: list[Layout]) -> str:
    """The rule `value` breaks: a search-space bound it exceeds, else the message
    `ParallelDims.fill` / `Layout.validate` (what `estimate` runs) gives for valid layouts
    with `axis` set to `value` (the most common one over the witnesses)."""
    bound = _space_bound(space, gpus_per_node, axis, value)
    if bound:
        return bound
    messages: dict[str, int] = {}
    for witness in witnesses:
        trial = replace(witness, **{axis: value}, layers_per_stage=None)
        try:
            trial.validate(model)  # the model's rules first, then the GPU count
            if axis != "dp" and space.dp is None:  # dp is what the other degrees leave over
                trial = replace(trial, dp=trial.dims.refill(world).dp)
            trial.validate(model, world)
        except SpecError as exc:
            text = str(exc).rstrip(".")
            messages[text] = messages.get(text, 0) + 1
    if messages:
        return max(messages, key=messages.get)
    return f"{_FLAG.get(axis, axis)}={value} is possible alone but not with the other options"


def _space_bound(space, gpus_per_node: int, axis: str, value: int) -> str | None:
    """The search-space limit `value` is outside of, if any."""
    max_tp = space.max_tp or gpus_per_node
    if axis == "tp" and value > max_tp:
        return (f"tp={value} is above the search's tp limit of {max_tp} GPUs (a node, or up to "
                f"8 GPUs of a larger NVLink domain); pass --max-tp {value} to allow it")
    if axis == "cp" and value > space.max_cp:
        return f"cp={value} is above the search's limit of {space.max_cp}"
    if axis == "vp" and space.max_vp is not None and value > space.max_vp:
        return f"vp={value} is above the search's limit of {space.max_vp} virtual stages per rank"
    return None


def _simplest(grid, axis: str):
    """Row indices, the simplest layouts first (the other degrees as small as possible), so a
    message about the fixed value shows few other numbers."""
    others = [getattr(grid, a) for a in FIXED_AXES if a not in (axis, "dp")]
    return np.lexsort(others[::-1] + [np.prod(others, axis=0)])


def _few(values: list[int], limit: int = 12) -> str:
    return str(values) if len(values) <= limit else f"{values[:limit]} (and {len(values) - limit} more)"
