"""What a search's trials run: :class:`Workload`, gathered by a front end from the user's pieces."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..training.batching import EvaluationBatches, TrainingBatches
from ..training.optimizers import OptimizerSpec
from ..training.state import SnapshotFactory
from ..training.steps import StepFn
from .trial import EvalStepFn, TrainStepFn

__all__ = ["Workload"]


@dataclass
class Workload:
    """What a search's trials run, gathered by a front end.

    ``source`` builds training batches (``None`` for an evaluation-only search). ``step``/``optimizer`` drive the
    built-in training step; ``train_step`` replaces it with a front end's own (e.g. Lightning's optimisation step).
    ``eval_step``/``eval_source`` add evaluation: inside every training trial when ``validate`` is true, and as a
    search of its own when ``search_evaluation`` is true (or when the workload does not train).
    ``extra_optimizers``, ``extra_state`` and ``ddp`` are kept, restored and charged as the session describes.
    """

    model: nn.Module
    source: TrainingBatches | None
    step: StepFn | None
    optimizer: OptimizerSpec | None
    train_step: TrainStepFn | None = None
    eval_step: EvalStepFn | None = None
    eval_source: EvaluationBatches | None = None
    validate: bool = False
    search_evaluation: bool = False
    extra_optimizers: Sequence[Any] = ()
    extra_state: Sequence[SnapshotFactory] = ()
    ddp: nn.parallel.DistributedDataParallel | None = None
    """The DDP wrapper around ``model``, when there is one (its gradient buckets are charged)."""
    inference: bool = False
    """An evaluation-only workload that sizes inference (``train=False``): its evaluation steps run under
    ``torch.inference_mode()``, ``steps_per_trial`` of them, each output kept until the next one is computed; the
    search looks further for larger samples and confirms its recommendation as a training search does.
    ``eval_source`` is then a :class:`TrainingBatches` (the function front end's ``BatchSource``)."""
    precision: str = "32-true"
    """The built-in step's precision (:mod:`batchfinder.training.precision`); a front end's own ``train_step`` runs
    in its framework's precision instead."""
    accumulation_steps: int = 1
    """The gradient accumulation the user's training runs with (Lightning's ``accumulate_grad_batches``, the
    Trainer's ``gradient_accumulation_steps``): without ``target_batch_size``, the recommendation is measured with it
    (:mod:`batchfinder.engine.accumulation`)."""
    notes: list[str] = field(default_factory=list)
    """What the front end did that the result should say (e.g. searched a compiled model's original module)."""

    @property
    def trains(self) -> bool:
        """True when trials run training steps."""
        return self.source is not None and (
            self.train_step is not None or (self.step is not None and self.optimizer is not None)
        )

    @property
    def searched_source(self) -> EvaluationBatches:
        """The batches the search's sizes are counted in: the training source, or the evaluation source of a
        workload that does not train."""
        source = self.source if self.trains else self.eval_source
        if source is None:
            raise ValueError("the workload has neither training nor evaluation batches")
        return source
