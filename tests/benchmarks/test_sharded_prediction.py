"""The comparison of docs/sharded-prediction.md: DeepSpeed's ZeRO-3 formula as computed by hand."""

from __future__ import annotations

from torch import nn

from benchmarks.sharded_prediction import GPT, deepspeed_zero3_gpu_bytes


def test_deepspeed_zero3_formula_counts_shared_parameters_once_and_the_largest_module() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 30))  # 220 and 630 parameters
    # 4 * largest_layer_params + 18 * total_params / total_gpus (deepspeed/runtime/zero/stage3.py)
    assert deepspeed_zero3_gpu_bytes(model, 4) == 4 * 630 + int(18 * 850 / 4)


def test_the_compared_model_is_gpt2_small_sized_with_a_tied_head() -> None:
    model = GPT(vocab=100, width=16, depth=2, heads=2, positions=8)
    assert model.head.weight is model.tokens.weight
    shared = sum({id(p): p.numel() for p in model.parameters()}.values())
    assert deepspeed_zero3_gpu_bytes(model, 1) == 4 * 100 * 16 + 18 * shared
