"""find_batch_size and try_batch_size (batchfinder/api.py) on the simulated GPU: exact, honest about memory, and without
side effects; a compiled model is searched through its original module."""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import batchfinder as bf
from batchfinder.devices.resolve import resolve_device
from batchfinder.search.strategies import StopReason, recommend_batch_size
from batchfinder.training.steps import make_step
from tests.helpers import MLP, Case, Deep, assert_unchanged, classification_data, make_case, snapshot

# Capacities named nowhere else in the repository, one per model shape.
CAPACITIES = {"mlp": "3.3MiB", "cnn": "9.7MiB", "dict": "2.6MB", "frozen": "1.7MiB"}


def test_reported_max_fits_max_plus_one_does_not_and_nothing_changed(case: Case):
    gpu = bf.SimulatedGPU(CAPACITIES[case.name], allocator="ideal")
    assert gpu.memory_allocated() == 0
    before = snapshot(case.model)
    result = bf.find_batch_size(case.model, case.dataset, device=gpu)

    assert 1 < result.max_batch_size < len(case.dataset)
    assert result.stop_reason == StopReason.BRACKET_CLOSED
    assert result.batch_size == math.floor(0.8 * result.max_batch_size)
    assert gpu.memory_allocated() == 0, "memory is back at its baseline"
    assert_unchanged(before, case.model)

    # The answer was tested by the search itself, and it is right: max fits, max + 1 does not.
    assert result.trial_for(result.max_batch_size).fits
    assert not result.trial_for(result.max_batch_size + 1).fits
    at_max = bf.try_batch_size(case.model, case.dataset, result.max_batch_size, device=gpu)
    above = bf.try_batch_size(case.model, case.dataset, result.max_batch_size + 1, device=gpu)
    assert at_max.fits and not above.fits
    assert at_max.peak_bytes <= gpu.capacity_bytes
    assert above.error and "CUDA out of memory" in above.error
    assert gpu.memory_allocated() == 0
    assert_unchanged(before, case.model)

    # Each trial reports what it measured.
    for trial in result.trials:
        assert trial.leaked_bytes == 0
        assert trial.baseline_bytes > 0  # the model is resident during trials
        if trial.fits:
            assert trial.steps == 2 and trial.seconds_per_step and trial.seconds_per_step > 0
            assert trial.peak_bytes <= gpu.capacity_bytes
        else:
            assert trial.seconds_per_step is None and trial.requested_bytes
            assert trial.peak_bytes + trial.requested_bytes > gpu.capacity_bytes
    fits = [t.peak_bytes for t in sorted(result.trials, key=lambda t: t.batch_size) if t.fits]
    assert fits == sorted(fits), "peak memory grows with the batch size"


def test_power_mode_stops_at_the_last_doubling():
    case = make_case("mlp")
    gpu = bf.SimulatedGPU(CAPACITIES["mlp"])
    exact = bf.find_batch_size(case.model, case.dataset, device=gpu)
    power = bf.find_batch_size(case.model, case.dataset, device=gpu, mode="power", init_batch_size=8)
    assert power.stop_reason == StopReason.POWER_STEP
    assert power.max_batch_size == 2 ** int(math.log2(exact.max_batch_size))
    assert power.num_trials < exact.num_trials
    assert power.num_ooms == 1


def test_the_dataset_length_caps_the_search():
    case = make_case("mlp")
    small = TensorDataset(*(t[:300] for t in case.dataset.tensors))
    result = bf.find_batch_size(case.model, small, device=bf.SimulatedGPU("64MiB"))
    assert result.max_batch_size == 300
    assert result.stop_reason == StopReason.DATASET_LENGTH
    assert max(t.batch_size for t in result.trials) == 300
    assert [t.batch_size for t in result.trials] == [16, 32, 64, 128, 256, 300]


def test_max_batch_size_caps_the_search():
    case = make_case("mlp")
    result = bf.find_batch_size(case.model, case.dataset, device=bf.SimulatedGPU("64MiB"), max_batch_size=100)
    assert result.max_batch_size == 100
    assert result.stop_reason == StopReason.MAX_BATCH_SIZE


def test_max_trials_returns_the_best_size_tried():
    case = make_case("mlp")
    result = bf.find_batch_size(case.model, case.dataset, device=bf.SimulatedGPU(CAPACITIES["mlp"]), max_trials=4)
    assert result.num_trials == 4
    assert result.stop_reason == StopReason.MAX_TRIALS
    assert result.max_batch_size == 128
    assert result.trial_for(128).fits


def test_time_budget_runs_at_least_one_trial():
    case = make_case("mlp")
    result = bf.find_batch_size(case.model, case.dataset, device=bf.SimulatedGPU(CAPACITIES["mlp"]), time_budget=1e-6)
    assert result.num_trials == 1
    assert result.stop_reason == StopReason.TIME_BUDGET
    assert result.max_batch_size == 16


def test_safety_and_multiple_of_shape_the_recommendation():
    case = make_case("mlp")
    gpu = bf.SimulatedGPU(CAPACITIES["mlp"])
    result = bf.find_batch_size(case.model, case.dataset, device=gpu, safety=0.5, multiple_of=32)
    assert result.batch_size == (result.max_batch_size // 2) // 32 * 32
    assert "multiple of 32" in result.explain()
    assert recommend_batch_size(14076) == 11260
    assert recommend_batch_size(1) == 1
    assert recommend_batch_size(20, multiple_of=32) == 1
    assert recommend_batch_size(100, safety=1.0) == 100


def test_report_text():
    case = make_case("frozen")
    result = bf.find_batch_size(case.model, case.dataset, device=bf.SimulatedGPU(CAPACITIES["frozen"], allocator="ideal"))
    text = str(result)
    assert f"recommended batch size: {result.batch_size}" in text
    assert f"largest that fits: {result.max_batch_size}; x0.8 = {result.batch_size}" in text
    assert "stopped: bracket closed" in text
    assert text.count("OOM") == result.num_ooms
    assert f"{result.num_trials} trials, {result.num_steps} steps, {result.num_ooms} out of memory" in text


def test_progress_callback_sees_every_trial():
    case = make_case("dict")
    seen: list[bf.Trial] = []
    result = bf.find_batch_size(case.model, case.dataset, device=bf.SimulatedGPU(CAPACITIES["dict"]), progress=seen.append)
    assert seen == result.trials


def test_progress_true_prints_a_heading_and_one_line_per_trial(capsys):
    case = make_case("mlp")
    small = TensorDataset(*(t[:40] for t in case.dataset.tensors))
    result = bf.find_batch_size(case.model, small, device=bf.SimulatedGPU("8MiB"), progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "searching training batch sizes on SimulatedGPU(8.00 MiB) (mode binsearch):"
    assert len(lines) == result.num_trials + 1 and "batch      16  fits" in lines[1]


def test_an_optimizer_instance_keeps_its_state_and_its_state_counts():
    case = make_case("mlp")
    optimizer = torch.optim.Adam(case.model.parameters(), lr=0.01)
    inputs, targets = case.dataset.tensors
    nn.functional.cross_entropy(case.model(inputs[:8]), targets[:8]).backward()
    optimizer.step()  # now it has exp_avg / exp_avg_sq for every parameter, and gradients are set
    before = snapshot(case.model, optimizer)
    gpu = bf.SimulatedGPU(CAPACITIES["mlp"], allocator="ideal")
    with_state = bf.find_batch_size(case.model, case.dataset, optimizer=optimizer, device=gpu)
    assert_unchanged(before, case.model, optimizer)
    assert optimizer.param_groups[0]["lr"] == 0.01
    fresh = bf.find_batch_size(case.model, case.dataset, optimizer=torch.optim.Adam, device=gpu)
    assert with_state.max_batch_size == fresh.max_batch_size  # Adam's state exists at step 2 either way
    assert with_state.trials[0].baseline_bytes > fresh.trials[0].baseline_bytes  # ... but was resident from the start


def test_optimizer_choice_matters_and_callables_work():
    case = make_case("mlp")
    gpu = bf.SimulatedGPU(CAPACITIES["mlp"])
    adam = bf.find_batch_size(case.model, case.dataset, device=gpu)
    sgd = bf.find_batch_size(case.model, case.dataset, device=gpu, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    assert sgd.max_batch_size > adam.max_batch_size  # no optimizer state leaves room for more samples


def test_dataloader_with_its_collate_fn_and_custom_step():
    case = make_case("dict")
    calls = {"collate": 0}

    def collate(samples):
        calls["collate"] += 1
        return {"input_ids": torch.stack([s["input_ids"] for s in samples]), "labels": torch.stack([s["labels"] for s in samples])}

    loader = DataLoader(case.dataset, batch_size=7, shuffle=True, collate_fn=collate)
    result = bf.find_batch_size(case.model, loader, device=bf.SimulatedGPU(CAPACITIES["dict"]), max_trials=5)
    assert calls["collate"] >= 5
    assert result.max_batch_size >= 16

    # step_fn replaces the default step: it is called with every trial's batch, steps_per_trial times each (and
    # once by the set-up's probe, with a batch of 2).
    sizes: list[int] = []

    def step_fn(model, batch):
        sizes.append(batch["input_ids"].shape[0])
        return model(batch["input_ids"], batch["labels"])["loss"] * 2

    stepped = bf.find_batch_size(case.model, loader, device=bf.SimulatedGPU(CAPACITIES["dict"]), step_fn=step_fn, max_trials=5,
                                 confirm_steps=0)  # the trials' calls alone
    assert stepped.max_batch_size == result.max_batch_size
    called = Counter(sizes)
    assert called[2] == 1 and set(called) == {2} | {t.batch_size for t in stepped.trials}
    for trial in stepped.trials:
        assert trial.steps <= called[trial.batch_size] <= trial.steps + (not trial.fits), trial

    # What step_fn allocates is measured: a scratch buffer far larger than a whole step at this size, freed at
    # once, puts the trial's peak exactly at (memory held when the step began) + (the buffer).
    gpu = bf.SimulatedGPU("64MiB")
    scratch = 4 * 1024 * 1024  # a multiple of 512 bytes: charged exactly
    held: list[tuple[int, int]] = []

    def scratch_step(model, batch):
        held.append((batch["input_ids"].shape[0], gpu.memory_allocated()))
        buffer = torch.empty(scratch // 4)
        del buffer
        return model(batch["input_ids"], batch["labels"])["loss"]

    plain = bf.try_batch_size(case.model, loader, 16, device=gpu)
    trial = bf.try_batch_size(case.model, loader, 16, device=gpu, step_fn=scratch_step)
    assert plain.fits and trial.fits and plain.peak_bytes < scratch
    in_trial = [level for size, level in held if size == 16]
    assert len(in_trial) == trial.steps == 2
    assert trial.peak_bytes == max(in_trial) + scratch


def _record_output_gradients(model: nn.Module, expected) -> tuple[list[tuple[int, bool]], object]:
    """Hook the model so that every backward pass records (batch size, whether the gradient of the loss with respect
    to the model's output equals ``expected(inputs, output)``). The gradient shows which loss was backpropagated."""
    seen: list[tuple[int, bool]] = []

    def forward_hook(module, args, output):
        inputs, out = args[0], output.detach()  # detached: the hook must not keep the graph alive in a cycle

        def gradient_hook(grad):
            with torch.no_grad():
                seen.append((out.shape[0], torch.allclose(grad, expected(inputs, out), rtol=1e-4, atol=1e-10)))

        output.register_hook(gradient_hook)

    return seen, model.register_forward_hook(forward_hook)


def _assert_every_step_backpropagated(seen: list[tuple[int, bool]], result) -> None:
    assert seen and all(ok for _, ok in seen), "the gradient reaching the output is not the expected loss's"
    counts = Counter(size for size, _ in seen)
    for trial in result.trials:
        if trial.fits:
            assert counts[trial.batch_size] == trial.steps, f"batch size {trial.batch_size}"


def test_loss_fn_and_tensor_only_samples():
    model = MLP(inputs=32, classes=32)
    data = TensorDataset(torch.randn(2000, 32))
    gpu = bf.SimulatedGPU("2MiB")

    # No target: the default loss is the mean of the output, whose gradient is 1/numel everywhere.
    seen, handle = _record_output_gradients(model, lambda x, out: torch.full_like(out, 1 / out.numel()))
    try:
        default = bf.find_batch_size(model, data, device=gpu, confirm_steps=0)  # the trials' steps alone
    finally:
        handle.remove()
    assert default.max_batch_size > 16
    _assert_every_step_backpropagated(seen, default)

    # A custom loss is called with the output alone (the samples have no target), and it is what is backpropagated:
    # the gradient of mean(out**2) is 2 * out / numel, not the default's constant.
    calls: list[tuple[int, ...]] = []

    def loss_fn(*args):
        calls.append(tuple(a.shape for a in args))
        return (args[0] ** 2).mean()

    seen, handle = _record_output_gradients(model, lambda x, out: 2 * out / out.numel())
    try:
        custom = bf.find_batch_size(model, data, device=gpu, loss_fn=loss_fn, confirm_steps=0)
    finally:
        handle.remove()
    assert custom.max_batch_size > 16
    sizes = {2} | {t.batch_size for t in custom.trials}  # the set-up probes with a batch of 2
    assert calls and all(len(c) == 1 and c[0][1:] == (32,) and c[0][0] in sizes for c in calls), calls
    called = Counter(c[0][0] for c in calls)
    assert all(called[t.batch_size] == t.steps for t in custom.trials if t.fits)
    _assert_every_step_backpropagated(seen, custom)


def test_regression_targets_use_mse():
    # Floating targets of the output's shape get mean squared error. Cross-entropy also accepts floating targets
    # (as class probabilities), so a search merely running proves nothing: check the loss and its gradient.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
    x, y = torch.randn(8, 20), torch.randn(8, 3)
    out = model(x)
    loss = make_step()(model, (x, y))
    assert torch.allclose(loss, F.mse_loss(out, y))
    assert not torch.allclose(loss, F.cross_entropy(out, y))

    # In a real search the gradient reaching the output is MSE's, 2 * (out - y) / numel (cross-entropy's would be
    # (softmax(out) - y) / batch). The target is a function of the input so that the hook can rebuild it.
    inputs = torch.randn(1000, 20)
    data = TensorDataset(inputs, 2 * inputs[:, :3] + 1)
    seen, handle = _record_output_gradients(model, lambda x, out: 2 * (out - (2 * x[:, :3] + 1)) / out.numel())
    try:
        result = bf.find_batch_size(model, data, device=bf.SimulatedGPU("1MiB", allocator="ideal"))
    finally:
        handle.remove()
    assert result.max_batch_size > 16
    _assert_every_step_backpropagated(seen, result)


def test_eval_mode_and_existing_gradients_are_preserved():
    case = make_case("cnn")
    case.model.eval()
    case.model.features[1].train()  # a mixed state
    inputs, targets = case.dataset.tensors
    nn.functional.cross_entropy(case.model(inputs[:4]), targets[:4]).backward()
    before = snapshot(case.model)
    bf.find_batch_size(case.model, case.dataset, device=bf.SimulatedGPU(CAPACITIES["cnn"]), max_trials=3)
    assert_unchanged(before, case.model)
    assert case.model.training is False and case.model.features[1].training is True


def test_a_user_simulated_gpu_keeps_what_it_held():
    case = make_case("mlp")
    gpu = bf.SimulatedGPU(CAPACITIES["mlp"])
    with gpu:
        resident = torch.zeros(64 * 1024)  # 256 KiB the user put on the device
    assert gpu.memory_allocated() == 256 * 1024
    smaller = bf.find_batch_size(case.model, case.dataset, device=gpu)
    assert gpu.memory_allocated() == 256 * 1024
    del resident
    assert gpu.memory_allocated() == 0
    full = bf.find_batch_size(case.model, case.dataset, device=gpu)
    assert smaller.max_batch_size < full.max_batch_size


def test_sim_device_string():
    # "sim:CAPACITY" is a SimulatedGPU of that capacity: the same trials, the same memory, the same answer.
    capacity = 1_782_579  # 1.7 MiB = 1,782,579.2 bytes
    assert resolve_device(f"sim:{CAPACITIES['frozen']}").allocator == "caching"  # the default; ":ideal" counts allocated bytes only
    backend = resolve_device(f"sim:{CAPACITIES['frozen']}:ideal")
    assert isinstance(backend, bf.SimulatedGPU) and backend.capacity_bytes == capacity and backend.allocator == "ideal"
    case = make_case("frozen")
    result = bf.find_batch_size(case.model, case.dataset, device=f"sim:{CAPACITIES['frozen']}:ideal")
    reference = bf.find_batch_size(case.model, case.dataset, device=bf.SimulatedGPU(capacity, allocator="ideal"))
    assert result.device == "SimulatedGPU(1.70 MiB, allocated bytes only)" and result.capacity_bytes == capacity
    assert result.max_batch_size == reference.max_batch_size
    assert [(t.batch_size, t.fits, t.peak_bytes) for t in result.trials] == [
        (t.batch_size, t.fits, t.peak_bytes) for t in reference.trials
    ]
    # the capacity is enforced: the largest size fits within it, the next one does not
    assert result.trial_for(result.max_batch_size).peak_bytes <= capacity
    assert not result.trial_for(result.max_batch_size + 1).fits
    assert all(t.peak_bytes > t.baseline_bytes > 0 for t in result.trials if t.fits)  # memory was charged


def test_a_compiled_model_is_searched_through_its_original_module_without_compiling():
    torch.manual_seed(0)
    model = Deep()
    compiled = torch.compile(model, backend="eager")
    data = classification_data(4096, (64,), 10)
    torch._dynamo.reset()
    found = bf.find_batch_size(compiled, data, device=bf.SimulatedGPU("16MiB"), confirm_steps=0)
    assert torch._dynamo.utils.counters["frames"]["total"] == 0  # nothing was compiled during the search
    plain = bf.find_batch_size(model, data, device=bf.SimulatedGPU("16MiB"), confirm_steps=0)
    assert found.max_batch_size == plain.max_batch_size
    assert any(note.startswith("torch.compile: the original (uncompiled) module was searched") for note in found.notes)
    assert "note: torch.compile" in str(found) and found.as_dict()["notes"] == found.notes
    # The compiled model trains at the size found.
    x, y = data.tensors
    loss = nn.functional.cross_entropy(compiled(x[: found.batch_size]), y[: found.batch_size])
    loss.backward()
    assert torch._dynamo.utils.counters["frames"]["total"] >= 1
