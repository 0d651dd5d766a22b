"""Training precision, with Lightning's names, and CUDA's autocast behaviour on CPU tensors.

``precision=`` takes ``"32-true"`` (the default: float32 everywhere), ``"16-mixed"`` and ``"bf16-mixed"`` (the step's
forward pass and loss under autocast to float16 / bfloat16; ``"16-mixed"`` also scales the loss with a
``GradScaler``), ``"16-true"`` and ``"bf16-true"`` (parameters and floating inputs in float16 / bfloat16).

A simulated GPU and the memory estimator run on CPU tensors, but stand for a CUDA GPU, so mixed precision must follow
**CUDA's** autocast policy, not the CPU's: the two cast different operations. On CUDA, ``softmax``, ``log_softmax``,
``layer_norm``, ``group_norm``, ``sum``, ``exp``, ``pow``, the losses and the upsampling operations run in float32
(their outputs, and what autograd saves for them, are float32); on the CPU they stay in the lower precision, and the
CPU instead casts operations CUDA leaves alone (``cat``, ``stack``, ``index_copy``, the 3-d pooling operations,
``cross_entropy_loss`` as one operation, the linear algebra and FFT operations). :func:`cuda_autocast` runs a block
under ``torch.autocast("cpu", dtype)`` with the CPU's autocast kernels replaced, for as long as the block runs, by
kernels with CUDA's policies (from PyTorch's CUDA autocast registrations: lower precision, float32, float32 with a
``dtype`` argument, float32 by appending a ``dtype``, promotion to the widest type, and ``binary_cross_entropy``
refused), and with the operations only the CPU casts falling through to no cast, as on CUDA. Casts of parameters
(leaf tensors that require grad) to the lower precision are cached for the block, as CUDA's autocast caches them.

Known limitations: the CPU's LSTM/GRU kernel (``mkldnn_rnn_layer``) keeps the CPU's cast to the lower precision,
which CUDA's cuDNN RNN also makes; operations that only exist on CUDA (flash attention kernels) are not run here:
:mod:`batchfinder.memory.kernels` charges their memory on the simulated GPU and in estimates.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from .state import deferred_interrupts

__all__ = [
    "PRECISIONS",
    "check_precision",
    "autocast_dtype",
    "parameter_dtype",
    "scales_loss",
    "cuda_autocast",
    "cuda_autocast_policies",
    "CUDA_POLICIES",
    "cast_floating",
    "cast_optimizer_state",
    "StepPrecision",
]

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
"""The precisions a search can train in (Lightning's names)."""

_LOWER = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
_TRUE = {"16-true": torch.float16, "bf16-true": torch.bfloat16}


def check_precision(precision: Any) -> str:
    """``precision`` when it is one of :data:`PRECISIONS`; a ``ValueError`` naming the valid ones otherwise."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not a training precision; choose one of {list(PRECISIONS)}")
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a mixed precision (None otherwise)."""
    return _LOWER.get(precision)


def parameter_dtype(precision: str) -> torch.dtype | None:
    """The parameters' (and floating inputs') dtype of a ``*-true`` precision other than float32 (None otherwise)."""
    return _TRUE.get(precision)


def scales_loss(precision: str) -> bool:
    """True when the precision trains with a ``GradScaler`` (``"16-mixed"``)."""
    return precision == "16-mixed"


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` (a tensor or nested tuples, lists and dicts) with its floating tensors cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return type(value)((k, cast_floating(v, dtype)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(cast_floating(v, dtype) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floating(v, dtype) for v in value)
    return value


@contextlib.contextmanager
def cast_optimizer_state(optimizers: list[torch.optim.Optimizer], dtype: torch.dtype) -> Iterator[None]:
    """For the length of the block, give the floating state tensors of ``optimizers`` (Adam's moments, a momentum
    buffer) the data cast to ``dtype``, as true half precision casts the parameters they belong to; a ``step``
    count keeps its dtype (as ``load_state_dict`` does). The very same tensor objects keep their places (their
    ``.data`` is swapped); on every exit each gets its original data back."""
    swapped: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for optimizer in optimizers:
            for param, entries in optimizer.state.items():
                if not (isinstance(param, torch.Tensor) and param.is_floating_point()):
                    continue
                for key, value in entries.items():
                    if (
                        key != "step"
                        and isinstance(value, torch.Tensor)
                        and value.is_floating_point()
                        and value.dtype != dtype
                        and id(value) not in swapped
                    ):
                        swapped[id(value)] = (value, value.data)
                        value.data = value.data.to(dtype)
        yield
    finally:
        for value, original in swapped.values():
            value.data = original


# -- CUDA's autocast policies (aten operations, as registered for AutocastCUDA) ---------------------------------------
_LOWER_PRECISION = "lower precision"
_FLOAT32 = "float32"
_SET_DTYPE = "float32 through its dtype argument"
_APPEND_DTYPE = "float32 through an added dtype argument"
_PROMOTE = "the widest input type"
_BANNED = "refused"

CUDA_POLICIES: dict[str, str] = {
    **dict.fromkeys(
        (
            "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d",
            "conv_transpose3d", "convolution", "cudnn_convolution", "cudnn_convolution_transpose", "prelu", "addmm",
            "addmv", "addr", "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm",
            "chain_matmul", "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell",
            "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "_scaled_dot_product_flash_attention",
            "scaled_dot_product_attention", "_cudnn_rnn",
        ),
        _LOWER_PRECISION,
    ),
    **dict.fromkeys(
        (
            "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
            "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "group_norm", "frobenius_norm",
            "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
            "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
            "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
            "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
            "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
            "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
            "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
            "rms_norm", "linalg_matrix_sqrth",
        ),
        _FLOAT32,
    ),
    **dict.fromkeys(
        ("prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm", "sum"),
        _SET_DTYPE,
    ),
    "norm": _APPEND_DTYPE,
    **dict.fromkeys(
        ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put", "tensordot",
         "scatter_add"),
        _PROMOTE,
    ),
    "binary_cross_entropy": _BANNED,
}
"""How CUDA's autocast treats each aten operation it registers a kernel for, by the operation's name."""

_KEEP_CPU_KERNEL = frozenset({"mkldnn_rnn_layer"})  # the CPU's RNN kernel: cuDNN's RNN casts to the lower precision too


def _registered(key: str) -> list[str]:
    return [
        name for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
    ]


def _base(name: str) -> str:
    return name[len("aten::"):].split(".")[0]


class _Emulation(threading.local):
    def __init__(self) -> None:
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


_STATE = _Emulation()
_LOCK = threading.RLock()
_LIBRARY: list[Any] = []  # the live registration: [library, its holders, torch's own clear_autocast_cache, the patch]
_NO_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _eligible(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        if not _eligible(value) or value.dtype == dtype:
            return value
        cacheable = (
            dtype == torch.get_autocast_dtype("cpu") and value.dtype == torch.float32 and value.requires_grad
            and value.is_leaf and not value._is_view() and torch.is_autocast_cache_enabled()
        )
        if not cacheable:
            return value.to(dtype)
        found = _STATE.cache.get(id(value))
        if found is None:
            found = (value, value.to(dtype))
            _STATE.cache[id(value)] = found
        return found[1]
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _kernel(op: Any, policy: str) -> Any:
    schema_names = [argument.name for argument in op._schema.arguments]

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
            lower = torch.get_autocast_dtype("cpu")
            if policy == _LOWER_PRECISION:
                return op(*_cast(list(args), lower), **{k: _cast(v, lower) for k, v in kwargs.items()})
            if policy == _FLOAT32:
                return op(*_cast(list(args), torch.float32), **{k: _cast(v, torch.float32) for k, v in kwargs.items()})
            if policy == _PROMOTE:
                widest = lower
                for value in (*args, *kwargs.values()):
                    for tensor in value if isinstance(value, (list, tuple)) else (value,):
                        if _eligible(tensor):
                            widest = torch.promote_types(widest, tensor.dtype)
                return op(*_cast(list(args), widest), **{k: _cast(v, widest) for k, v in kwargs.items()})
            if policy == _BANNED:
                raise RuntimeError(
                    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast (CUDA refuses "
                    "them under autocast): use binary_cross_entropy_with_logits / BCEWithLogitsLoss instead"
                )
            if not args or not _eligible(args[0]):
                return op(*args, **kwargs)
            if policy == _SET_DTYPE and "dtype" in schema_names:
                position = schema_names.index("dtype")
                if position < len(args):
                    args = (*args[:position], args[position] if args[position] is not None else torch.float32,
                            *args[position + 1:])
                elif kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
            if policy == _APPEND_DTYPE:
                overload = torch.ops.aten.norm.ScalarOpt_dtype if len(args) <= 2 and "dim" not in kwargs else (
                    torch.ops.aten.norm.ScalarOpt_dim_dtype
                )
                return overload(*args, **kwargs, dtype=torch.float32)
            return op(*args, **kwargs)

    return kernel


def _register() -> Any:
    """CUDA's policies as AutocastCPU kernels, all registered or none (a registration that raises, Ctrl-C included,
    is undone)."""
    from torch.library import Library, fallthrough_kernel

    library = Library("aten", "IMPL")
    try:
        cuda = _registered("AutocastCUDA")
        for name in cuda:
            policy = CUDA_POLICIES.get(_base(name))
            op_name = name[len("aten::"):]
            base, _, overload = op_name.partition(".")
            packet = getattr(torch.ops.aten, base, None)
            op = None if packet is None else getattr(packet, overload or "default", None)
            if policy is not None and op is not None:
                library.impl(op_name, _kernel(op, policy), "AutocastCPU")
        cuda_names = set(cuda)
        for name in _registered("AutocastCPU"):
            if name not in cuda_names and _base(name) not in _KEEP_CPU_KERNEL:
                library.impl(name[len("aten::"):], fallthrough_kernel, "AutocastCPU")
    except BaseException:
        library._destroy()
        raise
    return library


def _acquire(holder: object) -> None:
    """Count ``holder`` in; the first one registers the kernels and then, with everything it must undo recorded,
    patches ``torch.clear_autocast_cache``."""
    with _LOCK:
        if _LIBRARY:
            _LIBRARY[1].add(holder)
            return
        library = _register()
        try:
            original = torch.clear_autocast_cache

            def clear_both() -> None:  # torch.autocast's exit clears its cache: clear the emulation's with it
                _STATE.cache.clear()
                original()

            _LIBRARY[:] = [library, {holder}, original, clear_both]
            torch.clear_autocast_cache = clear_both
        except BaseException:
            _undo()
            library._destroy()
            raise


def _release(holder: object) -> None:
    """Count ``holder`` out (again is harmless); the last one restores ``torch.clear_autocast_cache`` and the CPU's
    own kernels."""
    with _LOCK:
        if not _LIBRARY or holder not in _LIBRARY[1]:
            return
        _LIBRARY[1].discard(holder)
        if not _LIBRARY[1]:
            _undo()


def _undo() -> None:
    """Restore ``torch.clear_autocast_cache`` and the CPU's kernels (each step harmless when already undone)."""
    if not _LIBRARY:
        return
    library, _, original, patch = _LIBRARY
    try:
        if torch.clear_autocast_cache is patch:
            torch.clear_autocast_cache = original
    finally:
        _LIBRARY.clear()
        library._destroy()


@contextlib.contextmanager
def cuda_autocast_policies() -> Iterator[None]:
    """For the length of the block, CPU autocast (``torch.autocast("cpu", dtype)``, entered by this library or by a
    framework such as Lightning's precision plugin) follows CUDA's policies: the CPU's autocast kernels are replaced
    while any such block runs (in any thread) and restored after the last one ends. Casts of parameters are cached
    until the outermost autocast region ends, as CUDA's autocast caches them.

    Entering and leaving are one step each, with Ctrl-C held back while the kernels are registered or removed: the
    patch of ``torch.clear_autocast_cache`` is assigned only once the kernels it goes with are registered, and an
    interrupt (or error) anywhere in that work undoes what was done. A search enters the block once for all its
    trials, inside its own Ctrl-C protection (registering the kernels takes about 80 ms); nested blocks only count."""
    holder = object()
    try:
        with deferred_interrupts():
            _acquire(holder)
        yield
    finally:
        try:
            with deferred_interrupts():
                _release(holder)
        finally:
            _release(holder)  # (an interrupt before the first call could hold it back)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype) -> Iterator[None]:
    """Autocast to ``dtype`` with CUDA's policies, for CPU tensors (real or fake), for the length of the block."""
    with cuda_autocast_policies(), torch.autocast("cpu", dtype=dtype):
        yield


class _TracingGradScaler(torch.amp.GradScaler):
    """A ``GradScaler`` for fake tensors: it makes the same tensors, but steps the optimizer without reading whether
    the gradients were finite (fake tensors have no values; a trace assumes they were)."""

    def _maybe_opt_step(self, optimizer: Any, optimizer_state: Any, *args: Any, **kwargs: Any) -> Any:
        return optimizer.step(*args, **kwargs)


class StepPrecision:
    """How one training step runs in ``precision``: its forward pass under autocast (CUDA's own on ``"cuda"``, CUDA's
    policies emulated on CPU tensors elsewhere), and for ``"16-mixed"`` a fresh ``GradScaler`` scaling the loss and
    stepping the optimizer (``tracing=True``: one that works on fake tensors)."""

    def __init__(self, precision: str, device_type: str, *, tracing: bool = False) -> None:
        self.precision = check_precision(precision)
        self.device_type = device_type
        self.dtype = autocast_dtype(precision)
        self.scaler: torch.amp.GradScaler | None = None
        if scales_loss(precision):
            scaler_type = _TracingGradScaler if tracing else torch.amp.GradScaler
            device = "cuda" if device_type == "cuda" else "cpu"
            self.scaler = scaler_type(device)
            # The scale and growth tracker, which the scaler makes at its first scale(), are made now, before the first
            # step: every step (the first included) then allocates the same, so one recorded trace can stand for every
            # batch size (batchfinder.memory.replay). Two 4-byte tensors, held for the trial either way.
            lazy_init = getattr(self.scaler, "_lazy_init_scale_growth_tracker", None)
            if lazy_init is not None and self.scaler.is_enabled():
                lazy_init(torch.device(device))

    def autocast(self) -> Any:
        """The context the forward pass and loss run in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        if self.device_type == "cuda":
            return torch.autocast("cuda", dtype=self.dtype)
        return cuda_autocast(self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
