"""The search layer: which batch size to try next, in pure Python (no torch; a test checks it).

Owns the search strategies and their ``propose``/``record``/``stop`` protocol (:mod:`.strategies`: doubling,
bisection, stop reasons, the safety arithmetic), the guided strategy and the solvers that invert a predicted peak
(:mod:`.guided`), the gradient-accumulation plan (:mod:`.accumulation`) and the numeric argument checks every front
end shares (:mod:`.checks`). Imports nothing of the package but :mod:`batchfinder.errors` and
:mod:`batchfinder.units`.
"""

from __future__ import annotations

from .accumulation import AccumulationPlan, plan_accumulation
from .strategies import StopReason, recommend_batch_size

__all__ = ["StopReason", "recommend_batch_size", "plan_accumulation", "AccumulationPlan"]
