"""Gradient accumulation planning (batchfinder.search.accumulation) and target_batch_size in find_batch_size."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import batchfinder as bf
from batchfinder.search.accumulation import (
    AccumulationPlan,
    plan_accumulation,
    validate_target_batch_size,
)
from tests.helpers import classification_data


def _brute_force_best_waste(target: int, safe: int, multiple_of: int) -> int:
    """Least waste over every plan the planner may choose from (micro-batch at least half the safe size)."""
    if safe < multiple_of:
        multiple_of = 1
    best = None
    for steps in range(1, target + 1):
        for micro in range(multiple_of, safe + 1, multiple_of):
            if micro * steps < target:
                continue
            if steps > 1 and micro < math.ceil(safe / 2):
                continue
            waste = micro * steps - target
            best = waste if best is None else min(best, waste)
            break  # larger micro-batches only waste more at this number of steps
    assert best is not None
    return best


@pytest.mark.parametrize(
    "target, safe, multiple_of",
    [(t, s, m) for t, s, m in itertools.product([1, 7, 64, 97, 100, 256, 1000, 1023], [1, 5, 16, 48, 100, 333], [1, 8])],
)
def test_plan_reaches_target_within_safe_size_with_least_waste(target: int, safe: int, multiple_of: int) -> None:
    plan = plan_accumulation(target, safe, multiple_of)
    assert 1 <= plan.micro_batch_size <= safe
    assert plan.accumulation_steps >= 1
    assert plan.micro_batch_size * plan.accumulation_steps == plan.effective_batch_size >= target
    assert plan.accumulation_steps >= math.ceil(target / safe)  # fewer steps cannot reach the target
    if safe >= multiple_of:
        assert plan.micro_batch_size % multiple_of == 0
    assert plan.waste == plan.effective_batch_size - target
    if multiple_of == 1:
        assert plan.waste == _brute_force_best_waste(target, safe, multiple_of)


def test_plan_examples() -> None:
    assert plan_accumulation(100, 48) == AccumulationPlan(100, 25, 4)  # exact, rather than 34 x 3 = 102
    assert plan_accumulation(64, 80) == AccumulationPlan(64, 64, 1)  # the target fits: no accumulation
    assert plan_accumulation(1024, 256) == AccumulationPlan(1024, 256, 4)
    plan = plan_accumulation(97, 48)  # a prime target: 33 x 3 = 99 beats 1 x 97 (much slower)
    assert (plan.micro_batch_size, plan.accumulation_steps, plan.waste) == (33, 3, 2)
    assert plan_accumulation(30, 28, 8) == AccumulationPlan(30, 16, 2)
    assert "micro-batch 25 x 4 accumulation steps = 100" in plan_accumulation(100, 48).describe()


@pytest.mark.parametrize("bad", [0, -3])
def test_target_below_one_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        validate_target_batch_size(bad)
    with pytest.raises(ValueError):
        plan_accumulation(bad, 10)


@pytest.mark.parametrize("bad", [2.5, "64", True])
def test_target_must_be_a_whole_number(bad: object) -> None:
    with pytest.raises(TypeError):
        validate_target_batch_size(bad)


def test_accumulation_module_does_not_import_torch() -> None:
    # Pure planning: neither it nor the argument checks it shares import torch when the module loads.
    code = (
        "import sys, types, importlib.util, pathlib; root = pathlib.Path('batchfinder'); "
        "sys.modules['batchfinder'] = types.ModuleType('batchfinder'); sys.modules['batchfinder'].__path__ = [str(root)]; "
        "m = importlib.import_module('batchfinder.search.accumulation'); "
        "print('torch' in sys.modules, m.plan_accumulation(100, 48).micro_batch_size)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert out.stdout.split() == ["False", "25"]


class CountingMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def test_find_batch_size_plans_accumulation_to_reach_the_target() -> None:
    torch.manual_seed(0)
    model = CountingMLP()
    result = bf.find_batch_size(model, classification_data(1000, (64,), 10), device=bf.SimulatedGPU("384KiB", allocator="ideal"),
                                target_batch_size=700)
    assert result.target_batch_size == 700
    assert result.batch_size < 700  # the target does not fit in one step on this device
    assert result.micro_batch_size <= result.batch_size
    assert result.accumulation_steps > 1
    assert result.micro_batch_size * result.accumulation_steps == result.effective_batch_size >= 700
    assert "gradient accumulation for target batch size 700" in str(result)
    # The micro-batch fits: a trial at that size ran (or a larger one did) and fitted.
    assert any(t.fits and t.batch_size >= result.micro_batch_size for t in result.trials)


def test_find_batch_size_without_target_has_no_accumulation() -> None:
    result = bf.find_batch_size(CountingMLP(), classification_data(1000, (64,), 10), device=bf.SimulatedGPU("384KiB", allocator="ideal"))
    assert result.target_batch_size is None
    assert (result.micro_batch_size, result.accumulation_steps) == (result.batch_size, 1)
    assert result.effective_batch_size == result.batch_size


def test_small_target_needs_no_accumulation() -> None:
    result = bf.find_batch_size(CountingMLP(), classification_data(1000, (64,), 10),
                                device=bf.SimulatedGPU("384KiB", allocator="ideal"), target_batch_size=24)
    assert (result.micro_batch_size, result.accumulation_steps) == (24, 1)


def test_bad_target_is_refused_before_any_trial() -> None:
    model = CountingMLP()
    with pytest.raises(ValueError, match="target_batch_size"):
        bf.find_batch_size(model, classification_data(1000, (64,), 10), device=bf.SimulatedGPU("384KiB", allocator="ideal"),
                           target_batch_size=0)
    assert model.calls == 0
