"""The engine layer: the one search every front end runs.

:func:`search` (in :mod:`.run`) takes a :class:`Workload` (what trials run, gathered by a front end) and
:class:`SearchOptions` (how to search, :mod:`.options`); the search modes are registered in :mod:`.modes`; one trial
runs in :mod:`.trial` (on a model sharded with FSDP2, in :mod:`.sharded`), the confirmation after a search in
:mod:`.confirmation`; ranks agree in :mod:`.distributed`;
out-of-memory errors are recognised in :mod:`.oom`. May import every layer below it (devices, memory, training,
search) and the result modules; never a front end (:mod:`batchfinder.api`, :mod:`batchfinder.cli`,
:mod:`batchfinder.lightning`, :mod:`batchfinder.hf`).
"""

from __future__ import annotations

from .options import SearchOptions
from .run import search
from .workload import Workload

__all__ = ["SearchOptions", "Workload", "search"]
