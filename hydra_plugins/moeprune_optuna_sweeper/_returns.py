"""A launched job's return as the trial's values, or the reason it has none: read by the sweep
loop (_core) and the confirmation runs (_confirm) alike, so it sits below both."""

from __future__ import annotations

import math
from typing import Optional

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf


def trial_values(ret: JobReturn, n: int) -> tuple[Optional[list[float]], Optional[str]]:
    """(values, None) for a usable return, (None, why) otherwise."""
    if ret.status != JobStatus.COMPLETED:
        return None, f"{type(ret._return_value).__name__}: {ret._return_value}"
    value = ret._return_value
    raw = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else [value]
    if len(raw) != n or any(v is None for v in raw):
        return None, (f"the task returned {value!r}; expected {n} number(s), one per direction "
                      "(check optimized_metric names values this run produces)")
    try:
        values = [float(v) for v in raw]
    except (TypeError, ValueError):
        return None, f"the task returned {value!r}, which is not numeric"
    if not all(math.isfinite(v) for v in values):
        return None, f"the task returned a non-finite value {values}"
    return values, None
