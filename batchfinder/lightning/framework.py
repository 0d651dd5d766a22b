"""The PyTorch Lightning names this integration uses, from ``pytorch_lightning`` or the unified ``lightning``."""

from __future__ import annotations

try:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.loggers.logger import DummyLogger
    from pytorch_lightning.utilities.model_helpers import is_overridden
    from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature
except ImportError:  # pragma: no cover - the unified ``lightning`` package
    import lightning.pytorch as pl  # type: ignore[no-redef]
    from lightning.pytorch.callbacks import Callback  # type: ignore[no-redef]
    from lightning.pytorch.loggers.logger import DummyLogger  # type: ignore[no-redef]
    from lightning.pytorch.utilities.model_helpers import is_overridden  # type: ignore[no-redef]
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature  # type: ignore[no-redef]

__all__ = ["pl", "Callback", "DummyLogger", "is_overridden", "is_param_in_hook_signature"]
