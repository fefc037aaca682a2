"""JSON that every parser accepts: a NaN or infinity (a CER with no samples, a diverged
loss) is written `null`, never the bare `NaN` Python's json module writes by default, which
strict parsers (jq, JavaScript, Go, Rust's serde) refuse."""

from __future__ import annotations

import json
import math


def finite(obj):
    """`obj` with every non-finite float, however deeply nested, replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """json.dumps of `finite(obj)`; `allow_nan=False` makes a value that slipped past it an error."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
