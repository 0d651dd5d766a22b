"""Checks of the model argument shared by every front end: each raises a ValueError/TypeError saying what is wrong
and what to do. The numeric checks are :mod:`batchfinder.search.checks`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "check_model",
    "check_materialised",
]

def check_model(model: Any) -> None:
    """Raise unless ``model`` is an ``nn.Module`` whose parameters are all initialised."""
    from torch import nn
    from torch.nn.parameter import UninitializedParameter

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")

    if any(isinstance(p, UninitializedParameter) for p in model.parameters()):
        raise ValueError("the model has uninitialised (lazy) parameters: run one forward pass before the search")


def check_materialised(model: "nn.Module") -> None:
    """Raise unless every parameter and buffer holds real data: a search runs real steps, and a model built on the
    ``meta`` device (e.g. under ``torch.device("meta")`` or with ``init_empty_weights``) has shapes but no values."""
    meta = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if meta:
        shown = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ValueError(
            f"the model is on the meta device ({shown} hold no data), so it cannot run real training steps: "
            "materialise it first, e.g. model.to_empty(device='cpu') (or 'cuda') followed by your weight "
            "initialisation or load_state_dict, or predict without running it with batchfinder.estimate_memory / "
            "batchfinder.predict_max_batch_size, which accept meta models"
        )
