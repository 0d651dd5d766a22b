"""What a memory estimate says: :class:`MemoryEstimate` (training memory at one batch size, by category) and
:class:`MemoryEstimates` (at several), with their tables, JSON and plots. Plain data: the estimator that computes
them is :mod:`batchfinder.memory.estimate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..search.checks import MIN_STEPS_PER_TRIAL
from ..units import format_bytes, parse_bytes

__all__ = ["MemoryEstimate", "MemoryEstimates", "ShardedMemory", "NO_OPTIMIZER"]

_CATEGORY_LABELS: tuple[tuple[str, str], ...] = (
    ("parameters", "parameters"),
    ("buffers", "buffers"),
    ("gradients", "gradients"),
    ("optimizer_state", "optimizer state"),
    ("batch", "batch (inputs + targets)"),
    ("activations", "activations, temporaries"),
)


@dataclass
class ShardedMemory:
    """What one rank of a sharded job gathers (:class:`~batchfinder.estimate.Sharding`): the estimate's ``parameters``,
    ``gradients`` and ``optimizer_state`` are that rank's shards; this says what it all-gathers to compute."""

    world_size: int
    rank: int
    description: str
    """The sharding, e.g. ``"FSDP2 over 8 ranks (rank 0), wrap=Linear"``."""
    units: int
    """Units that gather their parameters together (the wrapped modules, and the root if it owns parameters)."""
    unsharded_parameters: int
    """Bytes of all parameters gathered (padded to equal shards, in the gathered dtype, rounded per unit)."""
    largest_unit: str
    largest_unit_bytes: int
    """Gathered bytes of the largest unit: what one all-gather brings in."""
    gathered_at_peak: int
    """Bytes of gathered (unsharded) parameters held at the peak."""

    def as_dict(self) -> dict[str, Any]:
        """Every figure as plain JSON-ready values."""
        return dict(self.__dict__)

    def __str__(self) -> str:
        return (
            f"sharded: {self.description}; parameters, gradients and optimizer state above are rank {self.rank}'s "
            f"shards; gathered for compute: {format_bytes(self.unsharded_parameters)} over {self.units} unit(s), the "
            f"largest ({self.largest_unit}) {format_bytes(self.largest_unit_bytes)}, "
            f"{format_bytes(self.gathered_at_peak)} held at the peak"
        )


@dataclass
class MemoryEstimate:
    """Memory of training at one batch size, in bytes, by category (each storage rounded to 512 B): what
    :func:`estimate_memory` returns.

    ``parameters``, ``buffers``, ``gradients``, ``optimizer_state`` and ``batch`` are the full size of each category;
    ``activations`` is what the activations and temporaries hold at the peak; ``peak`` is the total at the peak,
    model included. ``at_peak`` splits ``peak`` exactly by category (at the peak some gradients may not exist yet,
    so ``at_peak["gradients"]`` can be below ``gradients``).
    """

    batch_size: int
    parameters: int
    gradients: int
    optimizer_state: int
    batch: int
    activations: int
    peak: int
    buffers: int = 0
    """Registered buffers (e.g. BatchNorm running statistics), not counted in ``parameters``."""
    peak_reserved: int = 0
    """Peak bytes PyTorch's CUDA caching allocator would reserve (segments of 2 MiB, 20 MiB or the request's size,
    with cached blocks reused and split) for the same step, from an empty cache: what a trial on
    ``SimulatedGPU(..., allocator="caching")`` reports as ``peak_reserved_bytes``. A real GPU runs out on this."""
    at_peak: dict[str, int] = field(default_factory=dict)
    """Bytes held at the peak by category (sums to ``peak``)."""
    peak_phase: str = ""
    """Where the peak happens, e.g. ``"backward (step 2)"`` or ``"optimizer step (step 1)"``."""
    phase_peaks: dict[str, int] = field(default_factory=dict)
    """Highest total in each phase of the step: forward, backward, optimizer step, zero_grad."""
    exact: dict[str, int] = field(default_factory=dict)
    """Unrounded tensor bytes of parameters, buffers, gradients, optimizer_state and batch."""
    parameter_count: int = 0
    trainable_parameter_count: int = 0
    sample_bytes: int = 0
    """Bytes of one sample on the device, inputs and targets, unrounded (3,136 + 8 for an MNIST image and label)."""
    sample_parts: dict[str, int] = field(default_factory=dict)
    """``sample_bytes`` by part: ``input``, ``target`` (and further tuple elements or dict keys)."""
    optimizer: str = ""
    model: str = ""
    sample: str = ""
    """The batch's structure, e.g. ``(Tensor[B, 1, 28, 28] float32, Tensor[B] int64)``, and, when a data set was
    given, which of its samples it is built from (the largest)."""
    steps: int = MIN_STEPS_PER_TRIAL
    sample_index: int | None = None
    """When a data set was given: the index of the sample used (its largest; 0 for fixed-size data)."""
    kernels: list[str] = field(default_factory=list)
    """Which kernel models applied (:mod:`batchfinder.memory.kernels`), e.g. ``["attention: memory-efficient
    (CUDA), 24 calls", "optimizer: foreach Adam (CUDA's default), 2 steps"]``."""
    sharded: ShardedMemory | None = None
    """With ``sharding=``: what the rank traced gathers (None for an unsharded model)."""

    @property
    def model_bytes(self) -> int:
        """Parameters, gradients, optimizer state and buffers: what does not depend on the batch size."""
        return self.parameters + self.buffers + self.gradients + self.optimizer_state

    def fits(self, capacity: int | str) -> bool:
        """True when the peak is within ``capacity`` (bytes, or a string such as ``"16GiB"``)."""
        return self.peak <= parse_bytes(capacity, argument="capacity")

    def as_dict(self) -> dict[str, Any]:
        """Every figure as plain JSON-ready values."""
        return {
            "batch_size": self.batch_size,
            "parameters": self.parameters,
            "buffers": self.buffers,
            "gradients": self.gradients,
            "optimizer_state": self.optimizer_state,
            "batch": self.batch,
            "activations": self.activations,
            "peak": self.peak,
            "peak_reserved": self.peak_reserved,
            "at_peak": dict(self.at_peak),
            "peak_phase": self.peak_phase,
            "phase_peaks": dict(self.phase_peaks),
            "exact": dict(self.exact),
            "parameter_count": self.parameter_count,
            "trainable_parameter_count": self.trainable_parameter_count,
            "sample_bytes": self.sample_bytes,
            "sample_parts": dict(self.sample_parts),
            "optimizer": self.optimizer,
            "model": self.model,
            "sample": self.sample,
            "steps": self.steps,
            "sample_index": self.sample_index,
            "kernels": list(self.kernels),
            "sharded": None if self.sharded is None else self.sharded.as_dict(),
        }

    def table(self) -> str:
        """The breakdown as a text table: each category's size and what it holds at the peak."""
        rows = [f"{'category':<26}{'size':>13}{'at the peak':>14}", "-" * 53]
        for key, label in _CATEGORY_LABELS:
            if key == "buffers" and not self.buffers:
                continue
            size = "-" if key == "activations" else format_bytes(getattr(self, key))
            held = format_bytes(self.at_peak.get(key, getattr(self, key)))
            rows.append(f"{label:<26}{size:>13}{held:>14}")
        rows.append("-" * 53)
        rows.append(f"{'peak':<26}{'':>13}{format_bytes(self.peak):>14}")
        return "\n".join(rows)

    def __str__(self) -> str:
        trainable = (
            f", {self.trainable_parameter_count:,} trainable" if self.trainable_parameter_count != self.parameter_count else ""
        )
        parts = " + ".join(f"{name} {size:,} B" for name, size in self.sample_parts.items())
        lines = [
            f"memory estimate: {self.model} ({self.parameter_count:,} parameters{trainable}), optimizer "
            f"{self.optimizer}, batch size {self.batch_size:,}",
            f"batch {self.sample}: {self.sample_bytes:,} B per sample ({parts})" if parts else f"batch {self.sample}",
            self.table(),
            f"the peak is in {self.peak_phase}; {self.steps} {'inference' if self.optimizer == NO_OPTIMIZER else 'training'} "
            "steps traced under fake tensors, every storage "
            "rounded up to 512 B as the CUDA allocator does",
            f"PyTorch's caching allocator would reserve {format_bytes(self.peak_reserved)} for this step from an empty "
            "cache (whole segments, cached blocks)",
            "not included: CUDA context, cuBLAS/cuDNN workspaces, fragmentation left by earlier work",
            *(["kernels: " + "; ".join(self.kernels)] if self.kernels else []),
            *([str(self.sharded)] if self.sharded is not None else []),
        ]
        return "\n".join(lines)

    def plot(self, path: Any, *, capacity: int | str | None = None, safety: float = 0.8) -> Any:
        """Write a PNG of this estimate (a stacked bar by category, the capacity and ``safety`` x capacity lines)."""
        from ..plot import plot_estimates

        return plot_estimates([self], path, capacity=capacity, safety=safety)


NO_OPTIMIZER = "none (inference)"
"""The optimizer an estimate of inference (``train=False``) names."""

class MemoryEstimates(list[MemoryEstimate]):
    """Estimates at several batch sizes (a list of :class:`MemoryEstimate`, in the order asked) with a table and a
    plot. What :func:`estimate_memory_curve` returns."""

    def table(self) -> str:
        """One row per batch size: its batch, activations and temporaries at the peak, peak, and where it peaks."""
        header = f"{'batch size':>10}  {'batch':>11}  {'activations':>11}  {'peak':>11}  peak in"
        rows = [header, "-" * (len(header) + 16)]
        for est in self:
            rows.append(
                f"{est.batch_size:>10,}  {format_bytes(est.batch):>11}  {format_bytes(est.activations):>11}  "
                f"{format_bytes(est.peak):>11}  {est.peak_phase}"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        if not self:
            return "no estimates"
        first: MemoryEstimate = self[0]
        buffers = f", buffers {format_bytes(first.buffers)}" if first.buffers else ""
        return "\n".join(
            [
                f"memory estimates: {first.model} ({first.parameter_count:,} parameters), optimizer {first.optimizer}",
                f"batch {first.sample}: {first.sample_bytes:,} B per sample",
                f"at every batch size: parameters {format_bytes(first.parameters)}, gradients "
                f"{format_bytes(first.gradients)}, optimizer state {format_bytes(first.optimizer_state)}{buffers}",
                self.table(),
                "(fake-tensor trace of the training step; each storage rounded up to 512 B; CUDA context and "
                "workspaces not included)",
            ]
        )

    def as_dicts(self) -> list[dict[str, Any]]:
        """Every estimate as :meth:`MemoryEstimate.as_dict`."""
        return [est.as_dict() for est in self]

    def plot(self, path: Any, *, capacity: int | str | None = None, safety: float = 0.8) -> Any:
        """Write a PNG: memory against batch size, stacked by category, with the capacity and ``safety`` lines."""
        from ..plot import plot_estimates

        return plot_estimates(list(self), path, capacity=capacity, safety=safety)
