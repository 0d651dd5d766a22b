"""What importing parts of PyTorch leaves in the process: contained, so that a search writes nothing to disk and
leaves the environment as it found it.

The first ``torch.optim.Optimizer`` a process creates imports ``torch._dynamo`` (``Optimizer.add_param_group`` is
wrapped by ``torch._disable_dynamo``, ``torch/_compile.py``), whose import asks inductor for its cache directory
(``torch/_inductor/runtime/cache_dir_utils.py``, ``cache_dir()``): that sets ``TORCHINDUCTOR_CACHE_DIR`` and creates
an empty ``torchinductor_<user>`` folder in the temporary directory. A search creates optimizers, so when it is the
first in the process to do so, :func:`torch_import_side_effects_contained` undoes both on exit: the variable is
removed again if it was not set before, and the folder is removed if it did not exist before and is still empty.
Inductor recreates both the next time it needs them (``cache_dir()`` reads the variable at every call).
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import re
import tempfile
from collections.abc import Iterator

__all__ = ["torch_import_side_effects_contained", "inductor_default_cache_dir"]

logger = logging.getLogger(__name__)

_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def inductor_default_cache_dir() -> str:
    """Where inductor puts its cache when ``TORCHINDUCTOR_CACHE_DIR`` is not set, as ``default_cache_dir()`` in
    ``torch/_inductor/runtime/cache_dir_utils.py`` computes it (outside Meta's fbcode)."""
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        getuid = getattr(os, "getuid", None)
        user = f"uid_{getuid()}" if callable(getuid) else "unknown_user"
    return os.path.abspath(os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user)))


@contextlib.contextmanager
def torch_import_side_effects_contained() -> Iterator[None]:
    """Undo, on exit, the environment variable and the empty cache folder that PyTorch's lazy ``torch._dynamo``
    import creates when it happens inside the block (see the module documentation). Nothing else is touched: a
    variable set before, or a folder that existed before or holds anything, stays."""
    before = os.environ.get(_CACHE_VARIABLE)
    folder = inductor_default_cache_dir() if before is None else None
    existed = folder is not None and os.path.exists(folder)
    try:
        yield
    finally:
        if before is None:
            made = os.environ.pop(_CACHE_VARIABLE, None)
            if made is not None and folder is not None and not existed and os.path.abspath(made) == folder:
                with contextlib.suppress(OSError):  # not empty (inductor compiled meanwhile), or gone: left alone
                    os.rmdir(folder)
                    logger.debug("removed the empty %s that importing torch._dynamo created", folder)
