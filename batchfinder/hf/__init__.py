"""The pieces behind :func:`batchfinder.hf.trainer.find_trainer_batch_size` (Hugging Face Transformers' Trainer).

:mod:`batchfinder.hf.workload` turns a ``Trainer`` into what the engine's trials run (its model, its training and
evaluation loaders as it builds them, its optimizer as it creates it, its loss, its precision); and
:mod:`batchfinder.hf.isolation` keeps what a search must not leave changed on the Trainer and its model, and writes
the result into ``trainer.args``. Nothing here imports ``transformers`` when the package is imported: a ``Trainer``
is handled through its own methods and attributes.
"""

from __future__ import annotations

__all__: list[str] = []
