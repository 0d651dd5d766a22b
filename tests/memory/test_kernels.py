"""CUDA's kernels on CPU tensors (:mod:`batchfinder.memory.kernels`): attention as CUDA's dispatcher picks it, the
optimizers' foreach step, and what each estimate and search says applied."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.memory.estimate import Estimator
from batchfinder.memory.gpus import lookup_gpu
from batchfinder.memory.kernels import KernelModels, attention_backend, check_kernels, cudnn_workspace
from batchfinder.memory.replay import record


class AttentionBlock(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention``, with attention dropout ``p`` in training."""

    def __init__(self, dim: int = 64, heads: int = 4, p: float = 0.1) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.heads, self.p = heads, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, length, dim))


def _qkv(dtype: torch.dtype = torch.float32, head: int = 64, length: int = 16) -> list[torch.Tensor]:
    return [torch.empty(2, 4, length, head, dtype=dtype) for _ in range(3)]


def test_the_backend_is_the_one_cudas_dispatcher_picks():
    assert attention_backend(*_qkv(torch.float32)) == "memory-efficient"  # flash needs half types
    assert attention_backend(*_qkv(torch.float16)) == "flash"
    assert attention_backend(*_qkv(torch.bfloat16), dropout_p=0.1) == "flash"  # flash supports dropout
    assert attention_backend(*_qkv(torch.float16), capability=(7, 5)) == "memory-efficient"  # flash needs sm80+
    assert attention_backend(*_qkv(torch.bfloat16), capability=(7, 5)) == "math"  # bf16 efficient needs sm80+
    mask = torch.zeros(16, 16, dtype=torch.bool)
    assert attention_backend(*_qkv(torch.float16), attn_mask=mask) == "memory-efficient"  # flash takes no mask
    assert attention_backend(*_qkv(torch.float16, head=260)) == "math"  # > 256, and not a multiple of 8
    assert attention_backend(*_qkv(torch.float32, head=66)) == "math"  # float32 on sm80 needs multiples of 4
    assert attention_backend(*_qkv(torch.float16, head=200), dropout_p=0.1, capability=(8, 6)) == "memory-efficient"
    assert attention_backend(*[torch.empty(2, 16, 64) for _ in range(3)]) == "math"  # 3-d inputs
    assert lookup_gpu("T4").compute_capability == (7, 5) and lookup_gpu("A100-40GB").compute_capability == (8, 0)


def test_attention_with_dropout_costs_what_it_costs_without():
    """CUDA's fused kernels never store the attention matrix or a dropout mask: dropout changes almost nothing (on
    the CPU's math path it stores both, about four times the memory)."""
    peaks = {
        (kernels, p): bf.estimate_memory(AttentionBlock(p=p), (256, 64), 8, kernels=kernels).peak
        for kernels in ("cuda", "cpu") for p in (0.1, 0.0)
    }
    assert abs(peaks["cuda", 0.1] - peaks["cuda", 0.0]) <= 0.15 * peaks["cuda", 0.0]
    assert peaks["cpu", 0.1] > 2 * peaks["cpu", 0.0]
    assert peaks["cuda", 0.1] < peaks["cpu", 0.1] / 2
    estimate = bf.estimate_memory(AttentionBlock(), (256, 64), 8)
    assert "attention: memory-efficient (CUDA), 2 calls" in estimate.kernels  # one call per step, two steps
    assert any(line.startswith("kernels: attention: memory-efficient") for line in str(estimate).splitlines())
    assert bf.estimate_memory(AttentionBlock(), (256, 64), 8, kernels="cpu").kernels == ["the CPU's (kernels='cpu')"]


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_the_modelled_attention_computes_what_pytorch_computes(p):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 16, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 4, 32, 16)
    torch.manual_seed(1)
    expected = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    with bf.SimulatedGPU("64MiB") as gpu:
        torch.manual_seed(1)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    assert torch.allclose(out, expected, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected_grads))
    assert gpu.kernel_notes() == ["attention: memory-efficient (CUDA), 1 call"]


def test_multihead_attention_without_weights_and_a_mask_go_through_the_model():
    mha = nn.MultiheadAttention(64, 4, dropout=0.1, batch_first=True)
    x = torch.randn(2, 16, 64)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    with KernelModels("cuda") as models:
        mha(x, x, x, need_weights=False)[0].sum().backward()
        mha(x, x, x, need_weights=False, attn_mask=~mask)[0].sum().backward()
        F.scaled_dot_product_attention(*(torch.randn(2, 4, 16, 16, dtype=torch.float16) for _ in range(3)))
    assert models.usage == {"attention: memory-efficient (CUDA)": 2, "attention: flash (CUDA)": 1}


def test_a_foreach_adam_step_holds_its_list_wide_temporaries():
    """CUDA's default Adam is the foreach one: its step holds ``sqrt`` of every second moment at once."""
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(16)])
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cuda = bf.estimate_memory(model, (1024,), 1, optimizer=torch.optim.Adam)
    assert cuda.peak >= 4.9 * parameter_bytes and cuda.peak_phase.startswith("optimizer step")
    assert "optimizer: foreach Adam (CUDA's default), 2 steps" in cuda.kernels
    loop = bf.estimate_memory(model, (1024,), 1, optimizer=lambda p: torch.optim.Adam(p, foreach=False))
    assert loop.peak < 4.5 * parameter_bytes  # an explicit foreach=False is respected
    assert "optimizer: for-loop Adam (foreach=False), 2 steps" in loop.kernels
    assert bf.estimate_memory(model, (1024,), 1, kernels="cpu").peak == loop.peak


def test_the_users_optimizer_keeps_its_foreach_setting():
    model = nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 8))
    bf.try_batch_size(model, data, 4, optimizer=optimizer, device=bf.SimulatedGPU("16MiB"))
    assert optimizer.param_groups[0]["foreach"] is None and not optimizer.state
    with KernelModels("cuda"):
        model(torch.randn(2, 8)).sum().backward()
        with pytest.raises(RuntimeError):
            optimizer.step(closure=lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert optimizer.param_groups[0]["foreach"] is None  # put back after a failed step too


def _trials_match_their_recording(model: nn.Module, data: list, step, optimizer, device) -> list[int]:
    """Record a trial on ``device``, then check that trials at 2, 5 and 17 reach the recording's replayed peaks to
    the byte; the trials' allocated peaks."""
    from batchfinder.engine.trial import TrialSession
    from batchfinder.training.batching import BatchSource
    from batchfinder.training.optimizers import resolve_optimizer

    session = TrialSession(model, BatchSource(data), step, resolve_optimizer(optimizer, model), device)
    peaks = []
    with session:
        recorded = session.record_allocations()
        assert recorded is not None and recorded.unsuitable is None
        for size in (2, 5, 17):
            replay = recorded.replay(size, device.capacity_bytes)
            trial = session.run(size)
            assert (replay.peak, replay.peak_reserved) == (trial.peak_bytes, trial.peak_reserved_bytes), size
            peaks.append(trial.peak_bytes)
    return peaks


def test_trials_replays_and_traces_follow_the_same_kernels_to_the_byte():
    from batchfinder.training.steps import make_step

    torch.manual_seed(0)
    model = AttentionBlock(dim=32, p=0.1)
    estimator = Estimator.create(model, (24, 32), optimizer=torch.optim.Adam)
    log = record(estimator.trainer)
    assert log.unsuitable is None, log.unsuitable
    for size in (2, 7, 33):
        trace = estimator.trainer.trace(size, breakdown=False)
        assert log.replay(size).peak == trace.peak
    data = [(torch.randn(24, 32), torch.randn(24, 32)) for _ in range(40)]
    _trials_match_their_recording(model, data, make_step(), torch.optim.Adam, bf.SimulatedGPU("64MiB"))
    result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("8MiB"), max_trials=3, confirm_steps=0)
    assert result.kernels[0].startswith("attention: memory-efficient (CUDA), ") and not result.notes
    assert "kernels: attention: memory-efficient (CUDA)" in str(result) and result.as_dict()["kernels"] == result.kernels


def test_a_16_mixed_prediction_replays_one_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    prediction = bf.predict_max_batch_size(model, (1, 8, 8), capacity="24MiB", precision="16-mixed")
    assert prediction.traces == 1 and prediction.method == "one trace, replayed at each size"
    estimator = Estimator.create(model, (1, 8, 8), precision="16-mixed", reserved=True, allocator_capacity=24 * 2**20)
    for size in (prediction.max_batch_size, prediction.max_batch_size + 1):
        try:
            trace = estimator.trace(size, breakdown=False)
        except torch.OutOfMemoryError:
            assert size == prediction.max_batch_size + 1
            continue
        assert size == prediction.max_batch_size and trace.peak_reserved == prediction.peak_bytes


def test_an_unknown_kernel_model_is_refused_clearly():
    with pytest.raises(ValueError, match="kernels='gpu' is not a kernel model; choose 'cuda'"):
        check_kernels("gpu")
    with pytest.raises(ValueError, match="kernels="):
        bf.SimulatedGPU("1GiB", kernels="gpu")


def test_the_command_line_takes_the_kernels(capsys):
    import json

    from batchfinder.cli import main

    args = ["estimate", "batchfinder.zoo:mnist_mlp", "--input", "1x28x28", "--batch-sizes", "1"]
    assert main([*args, "--json"]) == 0
    cuda = json.loads(capsys.readouterr().out)["estimates"][0]
    assert main([*args, "--json", "--kernels", "cpu"]) == 0
    cpu = json.loads(capsys.readouterr().out)["estimates"][0]
    assert cuda["kernels"] == ["optimizer: foreach Adam (CUDA's default), 2 steps"]
    assert cpu["kernels"] == ["the CPU's (kernels='cpu')"] and cpu["peak"] != cuda["peak"]
    assert main([*args, "--kernels", "cuda"]) == 0 and "kernels: optimizer: foreach Adam" in capsys.readouterr().out


def test_what_the_kernel_saved_is_released_by_backward_while_the_graph_lives_on():
    """A loop that keeps ``loss`` after ``backward()`` keeps the graph, not what the attention kernel saved."""
    block, x = AttentionBlock(p=0.1), torch.randn(2, 32, 64)
    with bf.SimulatedGPU("64MiB") as gpu:
        loss = block(x).sum()
        loss.backward()
        held = gpu.memory_allocated()
        del loss
        assert held - gpu.memory_allocated() <= 512  # only the loss itself


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Flatten(), nn.Linear(8 * 16 * 16, 4))


def test_a_fixed_cudnn_workspace_allowance_is_charged_forward_and_backward(monkeypatch):
    sample = (torch.randn(3, 16, 16), torch.tensor(1))
    plain = bf.estimate_memory(_conv_net(), sample, 4, loss_fn=F.cross_entropy, cudnn_workspace="none")
    with cudnn_workspace(0):
        assert bf.estimate_memory(_conv_net(), sample, 4, loss_fn=F.cross_entropy).peak == plain.peak
    charged: list[bool] = []
    original = KernelModels._charge_workspace
    monkeypatch.setattr(KernelModels, "_charge_workspace",
                        lambda self, like, n: (charged.append(torch.is_grad_enabled()), original(self, like, n))[1])
    workspace = 8 * 2**20
    with cudnn_workspace(workspace):
        allowed = bf.estimate_memory(_conv_net(), sample, 4, loss_fn=F.cross_entropy, steps_per_trial=2)
    # A transient block on top of what is live: the peak rises by at most the workspace, and by most of it.
    assert plain.peak + workspace // 2 < allowed.peak <= plain.peak + workspace
    # Two convolutions, two steps: one charge after each forward and one in each backward (grad mode off there).
    assert charged.count(True) == 4 and charged.count(False) == 4
    assert "convolution: cuDNN workspace allowance 8,388,608 B, 4 calls" in allowed.kernels
    assert not any("convolution" in line for line in plain.kernels)


def test_the_cudnn_workspace_allowance_is_the_same_in_trials_and_replays():
    from batchfinder.training.steps import make_step

    data = [(torch.randn(3, 16, 16), torch.tensor(i % 4)) for i in range(40)]
    plain = _trials_match_their_recording(_conv_net(), data, make_step(F.cross_entropy), torch.optim.SGD,
                                          bf.SimulatedGPU("256MiB"))
    with cudnn_workspace(3 * 2**20):
        allowed = _trials_match_their_recording(_conv_net(), data, make_step(F.cross_entropy), torch.optim.SGD,
                                                bf.SimulatedGPU("256MiB"))
    assert all(p < a <= p + 3 * 2**20 for p, a in zip(plain, allowed)), (plain, allowed)


@pytest.mark.parametrize(
    "bad, error",
    [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("64MiB", TypeError), ("benchmark", ValueError)],
)
def test_a_bad_cudnn_workspace_is_refused_clearly(bad, error):
    with pytest.raises(error, match="cudnn_workspace"):
        with cudnn_workspace(bad):
            pass


def test_by_default_each_forward_convolution_charges_its_input_and_output_bytes(monkeypatch):
    sample = (torch.randn(3, 16, 16), torch.tensor(1))
    sizes: list[tuple[bool, int]] = []
    original = KernelModels._charge_workspace
    monkeypatch.setattr(KernelModels, "_charge_workspace",
                        lambda self, like, n: (sizes.append((torch.is_grad_enabled(), n)), original(self, like, n))[1])
    auto = bf.estimate_memory(_conv_net(), sample, 4, loss_fn=F.cross_entropy, steps_per_trial=2)
    # Per step: conv 3->8 on 4x3x16x16 (12,288 B in, 32,768 B out), conv 8->8 (32,768 B in and out); none in backward.
    assert sizes == [(True, 12_288 + 32_768), (True, 65_536)] * 2
    assert "convolution: cuDNN workspace, input + output bytes in the forward pass (auto), 4 calls" in auto.kernels
    sizes.clear()
    none = bf.estimate_memory(_conv_net(), sample, 4, loss_fn=F.cross_entropy, cudnn_workspace="none")
    assert sizes == [] and none.peak <= auto.peak
    with cudnn_workspace("none"):  # an enclosing block sets the default, an argument overrides it
        assert bf.estimate_memory(_conv_net(), sample, 4, loss_fn=F.cross_entropy).peak_reserved == none.peak_reserved
        assert bf.estimate_memory(_conv_net(), sample, 4, loss_fn=F.cross_entropy,
                                  cudnn_workspace="auto").peak_reserved == auto.peak_reserved
    cpu = bf.estimate_memory(_conv_net(), sample, 4, loss_fn=F.cross_entropy, kernels="cpu")
    assert not any("convolution" in line for line in cpu.kernels)


def test_the_default_cudnn_workspace_is_the_same_in_trials_and_replays():
    from batchfinder.training.steps import make_step

    data = [(torch.randn(3, 16, 16), torch.tensor(i % 4)) for i in range(40)]
    _trials_match_their_recording(_conv_net(), data, make_step(F.cross_entropy), torch.optim.SGD,
                                  bf.SimulatedGPU("256MiB", cudnn_workspace="auto"))


@pytest.mark.parametrize("bad, error, words", [
    ("fast", TypeError, "'auto' (the default model), 'none' or a whole number of bytes"),
    ("benchmark", ValueError, "not modelled"),
    (-5, ValueError, "0 or more bytes"),
    (2.5, TypeError, "whole number of bytes"),
])
def test_a_bad_cudnn_workspace_argument_is_refused_before_anything_runs(bad, error, words):
    model = _conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (
        lambda: bf.estimate_memory(model, (3, 16, 16), 2, cudnn_workspace=bad),
        lambda: bf.predict_max_batch_size(model, (3, 16, 16), capacity="64MiB", cudnn_workspace=bad),
        lambda: bf.SimulatedGPU("64MiB", cudnn_workspace=bad),
        lambda: bf.SimulatedGPU.like("T4", cudnn_workspace=bad),
    ):
        with pytest.raises(error, match="cudnn_workspace") as info:
            call()
        assert words in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
