"""CUDA's kernels on CPU tensors: memory as a GPU's kernels allocate it, for the simulated GPU and the estimator.

The simulated GPU and the estimator run on CPU tensors (real or fake), but stand for a CUDA GPU. Where the CPU's
and CUDA's kernels allocate differently, :class:`KernelModels` makes a block run (or charge) what CUDA would, while
computing values that are correct on the CPU. It is entered next to the
:class:`~batchfinder.memory.accounting.ChargingMode` of a trial on the simulated GPU, of a fake-tensor trace and of
a recorded trial, so that all three follow the same models and stay equal to the byte. ``kernels="cpu"`` keeps the
CPU's kernels (the behaviour before these models existed).

The models, each chosen as CUDA chooses:

* **Scaled-dot-product attention** (``F.scaled_dot_product_attention``, which ``nn.MultiheadAttention`` with
  ``need_weights=False`` and Hugging Face's ``attn_implementation="sdpa"`` call). The backend is picked as
  ``select_sdp_backend`` in ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`` picks it, in its priority
  order flash, memory-efficient, math: flash needs sm80 to sm121, float16/bfloat16, no ``attn_mask``, equal head
  sizes of at most 256 (at most 192 in training with dropout on sm86-sm89), square sequences when ``is_causal``;
  memory-efficient needs sm50 to sm121, float16/float32 (bfloat16 from sm80), head sizes divisible by the GEMM
  alignment (``minimum_gemm_alignment``: 8 for half types, 4 for float32 on sm80+) and supports masks and dropout;
  both need 4-d dense inputs with a last-dimension stride of 1. The math backend runs as on the CPU (it is the same
  composite code: the N x N attention matrix, the dropout mask). For the fused backends the values are computed
  with PyTorch's own CPU implementation under no charge, and the kernel's tensors are charged in its order
  (``aten/src/ATen/native/transformers/cuda/attention.cu`` and ``attention_backward.cu``): forward, the output
  (``B x L x H x Dv`` in the inputs' dtype) then the log-sum-exp (float32, ``B x H x L``; memory-efficient pads
  L to a multiple of 32; for half types with value heads over 128 a float32 output accumulator, freed at once)
  and, for flash with dropout, the 2-element RNG state; a boolean mask becomes a float
  bias of its shape (``convert_boolean_attn_mask``), padded to a multiple of 16 in its last dimension for the
  memory-efficient kernel. Saved for backward: output, log-sum-exp, RNG state, never the attention matrix or a
  dropout mask. Backward allocates the three gradients, then its temporaries (flash: ``softmax_d``, float32
  ``B x H x round128(L)``, and the float32 ``dq_accum``, ``B x round128(L) x H x round32(D)``; memory-efficient:
  ``delta``, float32 ``B x H x L``, and for half types a float32 accumulator of the query's gradient), freed when
  it ends. The backward recomputes the CPU forward (with the forward's random state when
  there is dropout), so the host holds at most one attention matrix at a time. A mask that requires grad (a
  learned bias) takes the math path here, which gives it its gradient. cuDNN attention, which recent
  PyTorch prefers on sm90/sm100 with cuDNN 9.15+, saves the same (output and softmax statistics) and is charged as
  flash.
* **Optimizers.** On CUDA, ``torch.optim`` optimizers with a ``foreach`` option (Adam, AdamW, SGD, RMSprop, ...)
  default to the multi-tensor implementation (``_default_to_fused_or_foreach`` in ``torch/optim/optimizer.py``:
  every parameter on a foreach-supported device), whose step makes list-wide temporaries (``_multi_tensor_adam`` in
  ``torch/optim/adam.py``: ``torch._foreach_sqrt`` of every second moment at once, a copy of every gradient with
  ``weight_decay``); on the CPU the per-tensor loop is the default. While the models apply, an optimizer whose
  group leaves ``foreach`` unset (None) steps with ``foreach=True``, then the group is put back as it was; an
  explicit ``foreach=False`` or ``fused=True`` is respected (the foreach ops' CPU implementations allocate their
  outputs as a list, as CUDA's do).

* **cuDNN workspaces** (:mod:`batchfinder.memory.cudnn`). cuDNN's convolutions ask the caching allocator for a
  workspace while they run (``run_conv_plan`` in ``aten/src/ATen/native/cudnn/Conv_v8.cpp`` allocates
  ``plan.getWorkspaceSize()`` bytes through ``c10::cuda::CUDACachingAllocator`` after the output exists, and frees it
  when the kernel is queued). By default (``cudnn_workspace="auto"``) every ``conv1d``/``conv2d``/``conv3d`` charges
  a transient block of its input + output bytes after its output in the forward pass (a model calibrated against
  published measurements; its sizes are not cuDNN's own, which depend on the algorithm picked for a GPU and cuDNN
  version); ``"none"`` charges nothing, and a number of bytes is a fixed allowance charged after each output and
  again after each convolution's gradients in the backward pass (``cudnn_convolution_backward`` in
  ``aten/src/ATen/native/cudnn/ConvShared.cpp`` runs the input-gradient and then the weight-gradient plan, each with
  its workspace). The outputs and saved tensors of convolutions and batch norm need no model: operation by
  operation they are cuDNN's (``cudnn_batch_norm`` returns the output, ``save_mean``, ``save_var`` and a reserve
  space, empty for NCHW training without a fused activation, as the CPU's ``native_batch_norm`` returns output,
  ``save_mean`` and ``save_invstd``; ``convolution_backward`` allocates the input's, then the weight's, then the
  bias's gradient on both).

Not modelled: the workspace sizes cuDNN really picks (``"auto"`` is one rule for every call),
``torch.backends.cudnn.benchmark``'s search, the padded copies flash makes for head sizes that are not a multiple of
8.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..training.host import host_side_loading, loading_on_host
from .cudnn import (
    CudnnWorkspace,
    backward_workspace_bytes,
    cudnn_workspace,
    forward_workspace_bytes,
    resolve_cudnn_workspace,
)
from .cudnn import describe as _describe_workspace

__all__ = [
    "KERNELS",
    "DEFAULT_CAPABILITY",
    "KernelModels",
    "check_kernels",
    "attention_backend",
    "describe_usage",
    "cudnn_workspace",
]

KERNELS = ("cuda", "cpu")
"""``kernels=`` values: ``"cuda"`` (the default) follows CUDA's kernels, ``"cpu"`` the CPU's."""

DEFAULT_CAPABILITY = (8, 0)
"""The compute capability assumed where no GPU is named (an A100's: sm80)."""

_SDPA = torch._C._nn.scaled_dot_product_attention
_FLASH, _EFFICIENT, _MATH = "flash", "memory-efficient", "math"


def check_kernels(kernels: Any) -> str:
    """``kernels`` when it is one of :data:`KERNELS`; a ``ValueError`` naming the valid ones otherwise."""
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise ValueError(
            f"kernels={kernels!r} is not a kernel model; choose 'cuda' (memory as CUDA's kernels allocate it, the "
            "default) or 'cpu' (as the CPU's kernels do)"
        )
    return kernels


def _alignment(dtype: torch.dtype, capability: tuple[int, int]) -> int:
    """``minimum_gemm_alignment`` of sdp_utils.cpp: the head size divisor the memory-efficient kernel needs."""
    half = dtype in (torch.float16, torch.bfloat16)
    tensor_cores = capability[0] >= 8 or (capability[0] >= 7 and half)
    alignment = 4 if capability[0] >= 8 else 1
    if tensor_cores:
        alignment = max(alignment, 128 // (16 if half else 32))
    return alignment


def attention_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    capability: tuple[int, int] = DEFAULT_CAPABILITY,
    requires_grad: bool = True,
) -> str:
    """The backend CUDA's ``select_sdp_backend`` (sdp_utils.cpp) picks: ``"flash"``, ``"memory-efficient"`` or
    ``"math"``, on a GPU of compute capability ``capability``."""
    dense = all(t.dim() == 4 and t.layout == torch.strided and not t.is_nested for t in (query, key, value))
    if not dense or any(t.size(-1) != 1 and t.stride(-1) != 1 for t in (query, key, value)):
        return _MATH
    if any(t.size(0) != query.size(0) for t in (key, value)) or any(t.size(-2) == 0 for t in (query, key, value)):
        return _MATH
    if key.size(1) != value.size(1) or query.size(1) % key.size(1):
        return _MATH
    dtype = query.dtype
    if key.dtype != dtype or value.dtype != dtype:
        return _MATH
    major, minor = capability
    head_q, head_v = query.size(-1), value.size(-1)
    half = dtype in (torch.float16, torch.bfloat16)
    flash = (
        (8, 0) <= capability <= (12, 1)
        and half
        and attn_mask is None
        and head_q == key.size(-1) == head_v <= 256
        and not (is_causal and query.size(-2) != key.size(-2))
    )
    if flash and requires_grad and ((8, 6) <= capability <= (8, 9) or (12, 0) <= capability <= (12, 1)):
        flash = head_q <= 192 or (dropout_p == 0.0 and head_q > 224)
    if flash:
        return _FLASH
    dtypes = (torch.float16, torch.float32, torch.bfloat16) if major >= 8 else (torch.float16, torch.float32)
    alignment = _alignment(dtype, capability)
    efficient = (
        (5, 0) <= capability <= (12, 1)
        and dtype in dtypes
        and head_q == key.size(-1)
        and head_q % alignment == 0
        and head_v % alignment == 0
    )
    return _EFFICIENT if efficient else _MATH


@dataclass(frozen=True)
class _Call:
    backend: str
    query: torch.Tensor | None
    key: torch.Tensor | None
    value: torch.Tensor | None
    mask: torch.Tensor | None
    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool


def _round(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(tensor))


class _FusedAttention(torch.autograd.Function):
    """A fused attention kernel: values from the CPU's implementation (uncharged), memory as the CUDA kernel's."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: _Call) -> torch.Tensor:
        batch, heads, length = query.shape[:3]
        rng = None
        if call.dropout_p > 0 and not _is_fake(query):
            with host_side_loading():
                rng = torch.get_rng_state()
        with host_side_loading(), torch.no_grad(), _passing_through():
            result = _SDPA(
                query, key, value, attn_mask=call.mask, dropout_p=call.dropout_p, is_causal=call.is_causal,
                scale=call.scale, enable_gqa=call.enable_gqa,
            )
        # The kernel's output, in (B, L, H, Dv) layout, returned as the (B, H, L, Dv) view.
        out = torch.empty(
            (batch, length, heads, value.size(-1)), dtype=query.dtype, device=query.device
        ).transpose(1, 2)
        lse_length = _round(length, 32) if call.backend == _EFFICIENT else length
        lse = torch.empty((batch, heads, lse_length), dtype=torch.float32, device=query.device)
        state = None
        if call.backend == _FLASH and call.dropout_p > 0:
            state = torch.empty(2, dtype=torch.int64, device=query.device)
        if call.backend == _EFFICIENT and query.dtype != torch.float32 and value.size(-1) > 128:
            # kNeedsOutputAccumulatorBuffer: a float32 accumulator of the output, freed when the kernel returns.
            accumulator = torch.empty((batch, length, heads, value.size(-1)), dtype=torch.float32, device=query.device)
            del accumulator
        with host_side_loading():
            out.copy_(result)
        del result
        # The inputs travel to backward through save_for_backward (released by autograd once backward ran); the call
        # keeps only the mask and settings.
        ctx.call = _Call(call.backend, None, None, None, call.mask, call.dropout_p, call.is_causal, call.scale,
                         call.enable_gqa)
        ctx.rng, ctx.lse, ctx.state = rng, lse, state
        ctx.save_for_backward(query, key, value, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        call: _Call = ctx.call
        query, key, value, out = ctx.saved_tensors
        batch, heads, length, head = query.shape
        with host_side_loading(), torch.enable_grad(), _passing_through():
            inputs = [t.detach().requires_grad_(True) for t in (query, key, value)]
            fork = torch.random.fork_rng(devices=[]) if ctx.rng is not None else contextlib.nullcontext()
            with fork:
                if ctx.rng is not None:
                    torch.set_rng_state(ctx.rng)
                again = _SDPA(
                    *inputs, attn_mask=call.mask, dropout_p=call.dropout_p, is_causal=call.is_causal,
                    scale=call.scale, enable_gqa=call.enable_gqa,
                )
            computed = torch.autograd.grad(again, inputs, grad_out)
            del again, inputs
        grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (query, key, value)]
        if call.backend == _FLASH:
            temporaries = [
                torch.empty((batch, heads, _round(length, 128)), dtype=torch.float32, device=query.device),
                torch.empty((batch, _round(length, 128), heads, _round(head, 32)), dtype=torch.float32,
                            device=query.device),
            ]
        else:
            temporaries = [torch.empty((batch, heads, length), dtype=torch.float32, device=query.device)]
            if query.dtype != torch.float32:
                temporaries.append(torch.empty(query.shape, dtype=torch.float32, device=query.device))
        with host_side_loading():
            for grad, value_ in zip(grads, computed):
                grad.copy_(value_)
        del temporaries, computed
        # What the kernel kept for backward is released now, as autograd releases saved tensors after a node runs
        # (the graph itself may live on, e.g. while the loss is still referenced).
        ctx.call = ctx.lse = ctx.state = ctx.rng = None
        return grads[0], grads[1], grads[2], None


_LOCAL = threading.local()


@contextlib.contextmanager
def _passing_through() -> Iterator[None]:
    """Within this block the attention model steps aside (the CPU's implementation computes the values)."""
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    try:
        yield
    finally:
        _LOCAL.depth -= 1


def _autocast_inputs(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs (a floating mask included) as CUDA's autocast casts them for attention (to the lower precision:
    ``scaled_dot_product_attention`` is on CUDA's lower-precision list), when CPU autocast is on."""
    if not torch.is_autocast_enabled("cpu"):
        return tensors
    dtype = torch.get_autocast_dtype("cpu")
    return [t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors]


_CONVOLUTIONS = (torch.conv1d, torch.conv2d, torch.conv3d)


class _AttentionMode(TorchFunctionMode):
    def __init__(self, models: "KernelModels") -> None:
        super().__init__()
        self.models = models

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA and not getattr(_LOCAL, "depth", 0) and not loading_on_host():
            return self.models.attention(*args, **kwargs)
        if func in _CONVOLUTIONS and self.models.workspace not in ("none", 0) and not loading_on_host():
            return self.models.convolution(func, args, kwargs)
        return func(*args, **kwargs)


_PATCH_LOCK = threading.Lock()
_PATCH_USERS: list[Any] = [0, None]  # users, and the function the patch replaced


def _active() -> "KernelModels | None":
    stack = getattr(_LOCAL, "models", None)
    return stack[-1] if stack else None


def _modelled_sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` while kernel models are installed: Python code that
    looks the function up when it runs (``F.multi_head_attention_forward``, Hugging Face's ``sdpa`` attention)
    reaches the model of this thread even where the torch-function mode is set aside (inside a function that
    handed itself to the mode whole, as ``multi_head_attention_forward`` does)."""
    models = _active()
    if models is None or getattr(_LOCAL, "depth", 0) or loading_on_host():
        return _SDPA(*args, **kwargs)
    return models.attention(*args, **kwargs)


def _install_functional() -> None:
    with _PATCH_LOCK:
        _PATCH_USERS[0] += 1
        if _PATCH_USERS[0] == 1:
            _PATCH_USERS[1] = torch.nn.functional.scaled_dot_product_attention
            torch.nn.functional.scaled_dot_product_attention = _modelled_sdpa


def _remove_functional() -> None:
    with _PATCH_LOCK:
        _PATCH_USERS[0] -= 1
        if _PATCH_USERS[0] == 0:
            torch.nn.functional.scaled_dot_product_attention = _PATCH_USERS[1]


class KernelModels:
    """For the length of a ``with`` block on this thread, the kernel models of ``kernels="cuda"`` (see the module
    documentation) on a GPU of compute capability ``capability``; ``kernels="cpu"`` models nothing. Enter it inside
    a charging mode. :attr:`usage` counts which models applied."""

    def __init__(
        self,
        kernels: str = "cuda",
        capability: tuple[int, int] = DEFAULT_CAPABILITY,
        cudnn_workspace: CudnnWorkspace | None = None,
    ) -> None:
        self.kernels = check_kernels(kernels)
        self.capability = tuple(capability)
        self.usage: Counter[str] = Counter()
        """Calls per model, e.g. ``{"attention: memory-efficient (CUDA)": 24, "optimizer: foreach Adam (CUDA's
        default)": 2}``."""
        self.workspace: CudnnWorkspace = resolve_cudnn_workspace(cudnn_workspace)
        """What convolutions charge as cuDNN's workspace (:mod:`batchfinder.memory.cudnn`): ``"auto"``, ``"none"`` or a
        fixed allowance in bytes; None takes that of an enclosing ``cudnn_workspace()`` block, else ``"auto"``."""
        self._mode: _AttentionMode | None = None
        self._handles: list[Any] = []
        self._changed: list[dict[str, Any]] = []

    # -- the context ----------------------------------------------------------------------------------------------
    def __enter__(self) -> "KernelModels":
        if self.kernels != "cuda":
            return self
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._thread = threading.get_ident()
        self._handles = [
            register_optimizer_step_pre_hook(self._before_step),
            register_optimizer_step_post_hook(self._after_step),
        ]
        self._mode = _AttentionMode(self)
        self._mode.__enter__()
        _LOCAL.models = [*getattr(_LOCAL, "models", []), self]
        _install_functional()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            _remove_functional()
            _LOCAL.models = [m for m in getattr(_LOCAL, "models", []) if m is not self]
            mode.__exit__(*exc_info)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._restore()

    # -- optimizers -------------------------------------------------------------------------------------------------
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if threading.get_ident() != self._thread or loading_on_host():  # another thread's, or host-side work
            return
        name = type(optimizer).__name__
        label = None
        for group in optimizer.param_groups:
            if "foreach" not in group:
                continue
            if group.get("fused"):
                label = f"optimizer: fused {name} (fused=True)"
            elif group["foreach"] is None and not group.get("differentiable"):
                group["foreach"] = True
                self._changed.append(group)
                label = f"optimizer: foreach {name} (CUDA's default)"
            elif group["foreach"] is False:
                label = f"optimizer: for-loop {name} (foreach=False)"
            elif group["foreach"]:
                label = f"optimizer: foreach {name} (foreach=True)"
        if label is not None:
            self.usage[label] += 1

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if threading.get_ident() == self._thread:
            self._restore()

    def _restore(self) -> None:
        while self._changed:
            self._changed.pop()["foreach"] = None

    # -- attention --------------------------------------------------------------------------------------------------
    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        """``F.scaled_dot_product_attention`` with the memory of the backend CUDA would pick."""
        query, key, value, *rest = _autocast_inputs([query, key, value, *([attn_mask] if attn_mask is not None else [])])
        attn_mask = rest[0] if rest else None
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        backend = attention_backend(
            query, key, value, attn_mask, dropout_p, is_causal, capability=self.capability, requires_grad=training
        )
        if backend != _MATH and attn_mask is not None and attn_mask.requires_grad:
            backend = _MATH  # a learned bias: its gradient comes from the CPU's implementation
        self.usage[f"attention: {backend} (CUDA)"] += 1
        if backend == _MATH:
            with _passing_through():
                return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:
            # convert_boolean_attn_mask: a float bias of the mask's shape (-inf where masked).
            bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
            bias.masked_fill_(mask.logical_not(), -math.inf)
            mask = bias
        if mask is not None and backend == _EFFICIENT and mask.size(-1) % 16:
            # The memory-efficient kernel's bias is padded to a multiple of 16 in its last dimension (pad_bias).
            padded = torch.empty((*mask.shape[:-1], _round(mask.size(-1), 16)), dtype=mask.dtype, device=mask.device)
            padded[..., : mask.size(-1)].copy_(mask)
            mask = padded[..., : attn_mask.size(-1)]  # type: ignore[union-attr]
        call = _Call(backend, query, key, value, mask, float(dropout_p), bool(is_causal), scale, bool(enable_gqa))
        if not training:
            return self._inference(call)
        return _FusedAttention.apply(query, key, value, call)

    # -- convolutions -----------------------------------------------------------------------------------------------
    def convolution(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        """A convolution, then its cuDNN workspace (allocated after the output and freed, as ``run_conv_plan`` does;
        :mod:`batchfinder.memory.cudnn`); with a fixed allowance the backward charges it again once its gradients
        exist."""
        out = func(*args, **kwargs)
        inputs = args[0] if args else kwargs["input"]
        self.usage[_describe_workspace(self.workspace)] += 1
        self._charge_workspace(out, forward_workspace_bytes(self.workspace, inputs, out))
        backward = backward_workspace_bytes(self.workspace)
        if out.grad_fn is not None and backward:
            out.grad_fn.register_hook(lambda grad_inputs, grad_outputs: self._charge_workspace(out_like, backward))
        out_like = out.new_empty(0)  # only its device and kind (fake or real): keeps no activation alive
        return out

    def _charge_workspace(self, like: torch.Tensor, nbytes: int) -> None:
        if nbytes <= 0:
            return
        workspace = like.new_empty(nbytes, dtype=torch.uint8)
        del workspace

    def _inference(self, call: _Call) -> torch.Tensor:
        query, value = call.query, call.value
        batch, heads, length = query.shape[:3]
        with host_side_loading(), _passing_through():
            result = _SDPA(
                query, call.key, value, attn_mask=call.mask, dropout_p=call.dropout_p, is_causal=call.is_causal,
                scale=call.scale, enable_gqa=call.enable_gqa,
            )
        out = torch.empty((batch, length, heads, value.size(-1)), dtype=query.dtype, device=query.device).transpose(1, 2)
        with host_side_loading():
            out.copy_(result)
        return out

    def describe(self) -> list[str]:
        """What applied, e.g. ``["attention: memory-efficient (CUDA), 24 calls", "optimizer: foreach Adam (CUDA's
        default), 2 steps"]``."""
        return describe_usage(self.usage, self.kernels)


def describe_usage(usage: Counter[str] | dict[str, int], kernels: str = "cuda") -> list[str]:
    """Lines saying which kernel models applied and how often (``kernels="cpu"``: one line saying none did)."""
    if kernels == "cpu":
        return ["the CPU's (kernels='cpu')"]
    lines = []
    for label, count in sorted(usage.items()):
        unit = "step" if label.startswith("optimizer") else "call"
        lines.append(f"{label}, {count} {unit}{'s' if count != 1 else ''}")
    return lines
