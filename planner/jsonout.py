"""JSON on stdout: one object, strictly valid (RFC 8259 has no NaN or Infinity).

    from planner.jsonout import to_json
    click.echo(to_json(estimate.to_dict()))
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (nan, inf) replaced by None, recursively.

    A non-finite number in an output means "not defined" (e.g. the throughput of a layout
    that could not be timed); `null` says that in JSON, a bare `NaN` breaks every parser.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return finite_or_none(value.item())
    return value


def to_json(obj: Any) -> str:
    """Indented, strictly valid JSON text of `obj` (non-finite floats become null)."""
    return json.dumps(finite_or_none(obj), indent=2, allow_nan=False)
