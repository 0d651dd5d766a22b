"""OOMGuard: a plain training loop that runs out of memory redoes the step in micro-batches, and trains the same."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import batchfinder as bf
from batchfinder.guard import OOMGuard
from batchfinder.memory.accounting import round_allocation


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 10))


def _batches(count: int = 4, size: int = 2048) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 64, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(count)]


def _reference(batches, lr: float = 0.1) -> nn.Module:
    """The same steps unsplit, on the CPU, without any guard."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_an_out_of_memory_step_is_redone_in_micro_batches_and_trains_as_the_unsplit_loop():
    batches = _batches()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gpu = bf.SimulatedGPU("32MiB")  # a whole batch of 2,048 needs about 70 MiB of activations
    guard = OOMGuard(model, optimizer, device=gpu)
    losses = []
    with gpu.resident(model, optimizer), gpu:
        baseline = gpu.memory_allocated()
        for batch in batches:
            losses.append(guard.step(batch))
        optimizer.zero_grad(set_to_none=True)
        finite = [bool(torch.isfinite(loss)) and loss.shape == () for loss in losses]
        del losses
        assert gpu.memory_allocated() - baseline == sum(  # only the optimizer's momentum is left
            round_allocation(s.untyped_storage().nbytes()) for state in optimizer.state.values() for s in state.values()
            if isinstance(s, torch.Tensor)
        )
    assert guard.splits >= 1 and guard.micro_batch_size is not None and guard.micro_batch_size < 2048
    assert guard.retried_steps == guard.splits  # every split redid the same step: none lost, none repeated
    reference = _reference(batches)
    assert _max_difference(model, reference) < 1e-5
    assert all(finite)


def test_splits_chosen_by_hand_and_changed_mid_run_update_as_the_whole_batch():
    batches = _batches(count=5, size=100)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = OOMGuard(model, optimizer, micro_batch_size=33)  # 33 + 33 + 33 + 1: uneven shares
    for index, batch in enumerate(batches):
        if index == 2:
            guard.micro_batch_size = 7  # re-split mid-run
        guard.step(batch)
    assert _max_difference(model, _reference(batches)) < 1e-5


def test_a_sum_reduced_loss_adds_the_micro_batches_up():
    batches = _batches(count=3, size=60)
    loss_fn = lambda output, target: nn.functional.cross_entropy(output, target, reduction="sum")  # noqa: E731
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    guard = OOMGuard(model, optimizer, loss_fn=loss_fn, micro_batch_size=25, loss_reduction="sum")
    for batch in batches:
        guard.step(batch)
    reference = _model()
    plain = torch.optim.SGD(reference.parameters(), lr=0.001)
    for x, y in batches:
        plain.zero_grad()
        loss_fn(reference(x), y).backward()
        plain.step()
    assert _max_difference(model, reference) < 1e-4


def test_the_smaller_size_grows_back_after_clean_steps():
    model = _model()
    guard = OOMGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=10, grow_after=2)
    sizes = []
    for batch in _batches(count=5, size=40):
        guard.step(batch)
        sizes.append(guard.micro_batch_size)
    assert sizes == [10, 20, 20, 40, 40]


def test_a_batch_that_does_not_fit_one_sample_at_a_time_says_so():
    model = nn.Linear(2048, 2048)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gpu = bf.SimulatedGPU("20MiB")  # the weights (16 MiB) fit; their gradients do not
    guard = OOMGuard(model, optimizer, device=gpu)
    with gpu.resident(model, optimizer), gpu:
        with pytest.raises(torch.OutOfMemoryError) as caught:
            guard.step((torch.randn(4, 2048), torch.randn(4, 2048)))
    assert "a micro-batch of 1 sample does not fit" in "\n".join(caught.value.__notes__)
    assert guard.micro_batch_size == 1 and all(p.grad is None for p in model.parameters())


def test_another_error_propagates_with_its_own_type_and_drops_the_gradients():
    model = _model()
    guard = OOMGuard(model, torch.optim.SGD(model.parameters(), lr=0.1), step_fn=lambda m, b: m(b[0][:, :3]).sum())
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        guard.step(_batches(count=1, size=8)[0])
    assert guard.splits == 0 and all(p.grad is None for p in model.parameters())


def test_bad_input_is_refused_before_any_step():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not own the model's parameters"):
        OOMGuard(model, other)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        OOMGuard(model, optimizer, micro_batch_size=0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        OOMGuard(model, torch.optim.SGD)
    guard = OOMGuard(model, optimizer)
    with pytest.raises(ValueError, match=r"batch\[1\] has shape \[3\], not a batch of 8"):
        guard.step((torch.randn(8, 64), torch.randint(0, 10, (3,))))
    with pytest.raises(ValueError, match="cannot split"):
        guard.step((torch.randn(8, 64), object()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_guard_from_a_search_result_starts_at_the_recommended_size():
    model = _model()
    data = torch.utils.data.TensorDataset(*_batches(count=1, size=512)[0])
    result = bf.find_batch_size(model, data, optimizer=torch.optim.SGD, device="sim:32MiB", max_trials=4, confirm_steps=0)
    guard = bf.OOMGuard.from_result(result, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert guard.micro_batch_size == result.batch_size


def test_a_longer_batch_mid_run_splits_again_and_no_step_is_lost_or_repeated():
    """Sequences of varying length on a simulated GPU: the first long batch halves the micro-batch size, a longer
    one later halves it again; Adam's step count and the scheduler count one step per batch, and the weights equal
    the unsplit loop's."""
    g = torch.Generator().manual_seed(2)
    shapes = [(64, 4), (256, 4), (256, 2), (256, 16), (256, 4)]  # (samples, length)
    batches = [(torch.randn(n, n_len, 64, generator=g), torch.randint(0, 10, (n, n_len), generator=g)) for n, n_len in shapes]

    def step_fn(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    gpu = bf.SimulatedGPU("48MiB")
    guard = OOMGuard(model, optimizer, step_fn=step_fn, device=gpu)
    micro_sizes = []
    with gpu.resident(model, optimizer), gpu:
        for batch in batches:
            guard.step(batch)
            scheduler.step()
            micro_sizes.append(guard.micro_batch_size)
    assert micro_sizes == [None, 128, 128, 32, 32]  # split at the second batch, re-split at the longest
    assert guard.splits == 3 and guard.retried_steps == guard.splits
    assert all(state["step"].item() == len(batches) for state in optimizer.state.values())
    assert scheduler.last_epoch == len(batches)

    reference = _model()
    plain = torch.optim.Adam(reference.parameters(), lr=1e-3)
    plain_scheduler = torch.optim.lr_scheduler.StepLR(plain, step_size=1, gamma=0.9)
    for batch in batches:
        plain.zero_grad()
        step_fn(reference, batch).backward()
        plain.step()
        plain_scheduler.step()
    assert _max_difference(model, reference) < 1e-5


def test_each_out_of_memory_error_halves_the_micro_batch_size():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gpu = bf.SimulatedGPU("16MiB")
    guard = OOMGuard(model, optimizer, device=gpu, micro_batch_size=2048)
    tried = []
    original = guard._accumulate

    def recording(batch, total, size):
        tried.append(size)
        return original(batch, total, size)

    guard._accumulate = recording
    with gpu.resident(model, optimizer), gpu:
        guard.step(_batches(count=1, size=2048)[0])
    assert len(tried) >= 3 and tried == [2048 >> i for i in range(len(tried))]
    assert guard.micro_batch_size == tried[-1] and guard.splits == len(tried) - 1


def _two_rank_worker(rank: int, world: int, port: int, queue) -> None:
    import traceback

    from tests.helpers import gloo_rank

    try:
        with gloo_rank(rank, world, port):
            sizes = [256, 2048 if rank == 1 else 256, 256]  # rank 1's second batch runs out of memory on 32 MiB
            g = torch.Generator().manual_seed(10 + rank)
            batches = [(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]
            finals, splits = {}, {}
            for name in ("guarded", "reference"):
                model = _model()
                ddp = nn.parallel.DistributedDataParallel(model)
                optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
                gpu = bf.SimulatedGPU("32MiB" if name == "guarded" else "1GiB")
                guard = OOMGuard(ddp, optimizer, device=gpu) if name == "guarded" else None
                with gpu.resident(model, optimizer), gpu:
                    for x, y in batches:
                        if guard is not None:
                            guard.step((x, y))
                        else:  # plain DDP: its own all-reduce in backward
                            optimizer.zero_grad()
                            nn.functional.cross_entropy(ddp(gpu.to_device(x)), gpu.to_device(y)).backward()
                            optimizer.step()
                finals[name] = [p.detach().clone() for p in model.parameters()]
                splits[name] = guard.splits if guard is not None else 0
            difference = max((a - b).abs().max().item() for a, b in zip(finals["guarded"], finals["reference"]))
            queue.put((rank, {"difference": difference, "splits": splits["guarded"]}))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.mark.slow
def test_two_ranks_retry_together_and_train_as_plain_ddp():
    from tests.engine.test_distributed import _spawn

    results = _spawn(_two_rank_worker)
    assert results[0]["splits"] == results[1]["splits"] >= 1  # rank 0 fitted and still redid the batch with rank 1
    assert all(result["difference"] < 1e-5 for result in results.values())


def _interrupted_rank_worker(rank: int, world: int, port: int, queue) -> None:
    import time
    import traceback

    from tests.helpers import gloo_rank

    try:
        with gloo_rank(rank, world, port):
            model = _model()
            ddp = nn.parallel.DistributedDataParallel(model)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)

            def step(module: nn.Module, batch: Any) -> torch.Tensor:
                if rank == 1:
                    raise KeyboardInterrupt  # Ctrl-C on one rank, in its forward pass
                return nn.functional.cross_entropy(module(batch[0]), batch[1])

            guard = OOMGuard(ddp, optimizer, step_fn=step, device=bf.SimulatedGPU("1GiB"))
            started = time.perf_counter()
            try:
                guard.step((torch.randn(8, 64), torch.randint(0, 10, (8,))))
                outcome = "stepped"
            except BaseException as exc:  # the rank stays alive, as a notebook does
                outcome = type(exc).__name__
            queue.put((rank, {"outcome": outcome, "seconds": time.perf_counter() - started}))
            if rank == 1:
                time.sleep(12)  # alive, its process group open: the other rank must not wait for it to exit
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.mark.slow
def test_ctrl_c_on_one_rank_in_a_guarded_step_stops_the_other_at_once():
    from tests.engine.test_distributed import _spawn

    results = _spawn(_interrupted_rank_worker)
    assert results[1]["outcome"] == "KeyboardInterrupt"
    assert results[0]["outcome"] == "RankFailedError" and results[0]["seconds"] < 8


def test_several_ranks_without_ddp_are_refused(monkeypatch):
    model = _model()
    guard = OOMGuard(model, torch.optim.SGD(model.parameters(), lr=0.1))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="needs the model wrapped in DistributedDataParallel"):
        guard.step(_batches(count=1, size=8)[0])
