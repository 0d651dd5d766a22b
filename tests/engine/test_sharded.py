"""Models sharded with FSDP2 (``fully_shard``): searched on two gloo ranks, faults on one rank, bad input.

The two-rank tests spawn two processes (start method "spawn"); the workers are module-level functions that report
through a queue and never raise, and every run is bounded by a join timeout, so that a hang fails the test instead of
hanging CI. Each spawn runs several scenarios in one process group to keep the file's time low.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

import batchfinder as bf
from batchfinder.engine.distributed import check_supported_wrapper
from batchfinder.engine.ranks import RankAgreement
from batchfinder.engine.sharded import CollectiveCheckpoints, check_sharded_model, reset_sharded_state
from batchfinder.memory.accounting import round_allocation, tensor_storages
from batchfinder.units import parse_bytes
from tests.helpers import gloo_rank, spawn_ranks

fsdp = pytest.importorskip("torch.distributed.fsdp")
fully_shard = fsdp.fully_shard

JOIN_TIMEOUT_S = 150
ENDS_WITHIN_S = 20
CAPACITIES = ("640KiB", "512KiB")  # rank 0 has more memory than rank 1 (allocated bytes only: allocator="ideal")
NOTHING_FITS = ("640KiB", "240KiB")  # batch size 1 fits on rank 0 only
WIDTH = 64
FAILING = 1


def _model(layers: int = 7, *, reshard: bool = True, mixed: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else None
    extra = {"mp_policy": policy} if policy is not None else {}
    for layer in model:
        fully_shard(layer, reshard_after_forward=reshard, **extra)
    fully_shard(model, reshard_after_forward=reshard, **extra)
    return model


def _data(n: int = 512) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, WIDTH, generator=generator), torch.randn(n, WIDTH, generator=generator))


def _is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "to_local")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).detach().clone()


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    assert all(_is_sharded(p) for p in model.parameters())
    tensors = [_local(p) for p in model.parameters()]
    tensors += [_local(p.grad) for p in model.parameters() if p.grad is not None]
    for entries in optimizer.state.values():
        tensors += [_local(v) for v in entries.values() if isinstance(v, torch.Tensor)]
    return [*tensors, torch.get_rng_state()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def _trained(model: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``model`` with an Adam optimizer that has stepped once and sharded gradients of a further backward pass (state
    the search must keep)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _data().tensors
    nn.functional.mse_loss(model(x[:8]), y[:8]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x[8:16]), y[8:16]).backward()
    return model, optimizer


def _step_loss(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[float]:
    """Two training steps of the user's own loop; their losses."""
    x, y = _data().tensors
    losses = []
    for start in (16, 32):
        loss = nn.functional.mse_loss(model(x[start : start + 16]), y[start : start + 16])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _brute_force(model: nn.Module, optimizer: torch.optim.Optimizer, size: int, capacity: str) -> bool:
    """Three plain training steps at ``size`` under ``SimulatedGPU(capacity)``, as a user would check the answer:
    True when they fit on this rank. The user's loop is guarded by the rounds of the search (a rank that runs out of
    memory must not leave the other waiting in an all-gather) and FSDP2's state is reset afterwards."""
    x, y = (t[:size].clone() for t in _data().tensors)  # the batch alone (a slice would hold the whole data set)
    checkpoints = CollectiveCheckpoints(RankAgreement())
    fitted = False
    try:
        with checkpoints.trial(size) as outcome:
            try:
                with bf.SimulatedGPU(capacity, allocator="ideal"):
                    for _ in range(3):
                        nn.functional.mse_loss(model(x), y).backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                fitted = outcome[0] = True
            except torch.OutOfMemoryError:
                pass
    finally:
        checkpoints.agreement.close()
    reset_sharded_state(model)
    optimizer.zero_grad(set_to_none=True)
    return fitted


# -- the search on two ranks of different capacities ------------------------------------------------------------
def _charges() -> tuple[int, int, int]:
    """What a SimulatedGPU charges for a sharded model's parameters, then after one forward and backward pass (with
    the batch still held), and what this rank's shards of parameters and gradients and the batch take."""
    model = _model()
    x, y = (t[:8].clone() for t in _data().tensors)
    with bf.SimulatedGPU("64MiB", allocator="ideal") as gpu:
        gpu.ledger.charge(tensor_storages(list(model.parameters())))
        params = gpu.memory_allocated()
        nn.functional.mse_loss(model(x), y).backward()
        after = gpu.memory_allocated()
    shards = sum(round_allocation(p.to_local().numel() * 4) for p in model.parameters())
    return params, after, 2 * shards + 2 * round_allocation(x.numel() * 4)


def _search(rank: int) -> dict[str, Any]:
    report: dict[str, Any] = {"charges": _charges()}
    capacity, smaller = CAPACITIES[rank], min(CAPACITIES, key=parse_bytes)
    model, optimizer = _trained(_model())
    before = _state(model, optimizer)
    started = time.perf_counter()
    result = bf.find_batch_size(
        model, _data(), optimizer=optimizer, loss_fn=nn.MSELoss(), device=bf.SimulatedGPU(capacity, allocator="ideal")
    )
    report["seconds"] = time.perf_counter() - started
    report["trials"] = len(result.trials)
    report["restored"] = _same(before, _state(model, optimizer))
    report["sizes"] = (result.max_batch_size, result.batch_size, result.smallest_failure)
    report["errors"] = [t.error for t in result.trials if not t.fits]
    # The user's training after the search: the same losses as a model that was never searched.
    reference, reference_optimizer = _trained(_model())
    report["losses"] = (_step_loss(model, optimizer), _step_loss(reference, reference_optimizer))
    # Brute force on the searched model: the recommended and the largest size fit on the smaller GPU on both
    # ranks; the smallest size that failed does not fit on at least one rank.
    report["brute"] = {
        "recommended": _brute_force(model, optimizer, result.batch_size, smaller),
        "largest": _brute_force(model, optimizer, result.max_batch_size, capacity),
        "failed": _brute_force(model, optimizer, result.smallest_failure, capacity),
    }
    # reshard_after_forward=False with a bf16 mixed-precision policy: the same size on both ranks.
    model, optimizer = _trained(_model(4, reshard=False, mixed=True))
    before = _state(model, optimizer)
    other = bf.find_batch_size(
        model, _data(), optimizer=optimizer, loss_fn=nn.MSELoss(), device=bf.SimulatedGPU(capacity, allocator="ideal")
    )
    report["kept_unsharded"] = other.max_batch_size
    report["kept_restored"] = _same(before, _state(model, optimizer))
    # Batch size 1 fits on rank 0 but not on rank 1: each rank's error says which rank it did not fit on.
    model, optimizer = _trained(_model())
    try:
        bf.find_batch_size(model, _data(), optimizer=optimizer, loss_fn=nn.MSELoss(),
                           device=bf.SimulatedGPU(NOTHING_FITS[rank], allocator="ideal"), init_batch_size=1)
        report["nothing_fits"] = "it fitted"
    except bf.NoBatchSizeFitsError as exc:
        report["nothing_fits"] = str(exc)
    return report


def _worker(rank: int, world: int, port: int, queue: Any) -> None:
    try:
        with gloo_rank(rank, world, port):
            queue.put((rank, {"search": _search(rank), "faults": _faults(rank)}))
    except BaseException:
        queue.put((rank, traceback.format_exc()))


@pytest.fixture(scope="module")
def two_ranks() -> dict[int, Any]:
    """What each of two gloo ranks reported: the searches, then the faults (one spawn for both: starting two
    processes costs more than the runs)."""
    return spawn_ranks(_worker, 2, timeout_s=JOIN_TIMEOUT_S)


@pytest.mark.slow
def test_two_ranks_of_different_capacities_find_the_same_tight_size(two_ranks):
    results = {rank: report["search"] for rank, report in two_ranks.items()}
    first, second = results[0], results[1]
    assert first["sizes"] == second["sizes"], results
    largest, recommended, failed = first["sizes"]
    assert 8 < largest < 512 and failed is not None and failed > largest and recommended <= largest
    # The smaller capacity decides: rank 1 ran out of memory, rank 0 learned it at a collective.
    assert any(e and "out of memory" in e and "simulated" in e for e in second["errors"])
    assert any(e and e.startswith("rank 1 ran out of memory at batch size") for e in first["errors"])
    for report in results.values():
        # Each rank is charged its shards (half of each weight matrix), not the DTensors' global size; after a step
        # it holds its parameters' and gradients' shards and the batch: the gathered parameters were released.
        params, after, expected = report["charges"]
        assert params == expected // 2 - round_allocation(8 * WIDTH * 4) == 7 * (WIDTH // 2 * WIDTH * 4 + 512)
        # gloo's worker thread may still hold the last reduce-scatter's flat input (one unit, both ranks' shards) for
        # a moment when backward returns; without the released storages every unit's gathered weights would remain.
        assert expected <= after <= expected + round_allocation(2 * (WIDTH // 2 * WIDTH + WIDTH // 2) * 4)
        assert report["restored"], "weights, gradients, optimizer state and RNG must be as before the search"
        searched, reference = report["losses"]
        assert searched == reference  # a normal training step after failed trials: same losses, bit for bit
        assert report["brute"]["recommended"] and report["brute"]["largest"]
        assert report["kept_restored"]
    assert not (first["brute"]["failed"] and second["brute"]["failed"]), "the answer is not tight"
    assert first["kept_unsharded"] == second["kept_unsharded"] > 0
    assert first["nothing_fits"].startswith("batch size 1 does not fit on every rank: rank 1 ran out of memory")
    assert second["nothing_fits"].startswith("batch size 1 does not fit on SimulatedGPU(")
    print(f"2-rank sharded search: {first['seconds']:.1f} s, {first['trials']} trials, sizes {first['sizes']}")


# -- faults on one rank at every phase of a sharded step --------------------------------------------------------
_BATCH = 0
_ARMED: tuple[str, str] | None = None  # (phase, kind): kind "oom", "error" or "interrupt"


def _fault(phase: str) -> None:
    if _ARMED is None or _ARMED[0] != phase or _BATCH < 32:
        return
    kind = _ARMED[1]
    if kind == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 MiB (injected in {phase})")
    if kind == "interrupt":
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    raise RuntimeError(f"a bug in {phase} on rank 1 only")


PHASES = (
    "all_gather_buffer", "forward_before_unshard", "forward_after_unshard", "backward", "reduce_scatter",
    "optimizer_step",
)


def _faulty(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Install the fault points of every phase on the failing rank (armed one at a time by ``_ARMED``)."""
    import torch.distributed.fsdp._fully_shard._fsdp_collectives as collectives
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as groups

    def batch(module: nn.Module, args: Any) -> None:
        global _BATCH
        _BATCH = args[0].shape[0]

    model.register_forward_pre_hook(batch, prepend=True)
    model[2].register_forward_pre_hook(lambda m, a: _fault("forward_before_unshard"), prepend=True)  # before FSDP's
    model[2].register_forward_pre_hook(lambda m, a: _fault("forward_after_unshard"))  # after FSDP's unshard
    model[2].register_full_backward_pre_hook(lambda m, g: _fault("backward"))
    real_reduce = groups.foreach_reduce

    def foreach_reduce(*args: Any, **kwargs: Any) -> Any:
        _fault("reduce_scatter")  # the reduce-scatter's buffers are being allocated
        return real_reduce(*args, **kwargs)

    groups.foreach_reduce = foreach_reduce
    real_allocate = collectives.DefaultAllocMixin.allocate

    def allocate(*args: Any, **kwargs: Any) -> Any:
        # An all-gather's output buffer (or a reduce-scatter's), after the last round and before the collective.
        _fault("all_gather_buffer")
        return real_allocate(*args, **kwargs)

    collectives.DefaultAllocMixin.allocate = allocate
    optimizer.register_step_pre_hook(lambda o, a, k: _fault("optimizer_step"))


def _faults(rank: int) -> dict[str, Any]:
    global _ARMED
    report: dict[str, Any] = {}
    device = bf.SimulatedGPU("4MiB", allocator="ideal")
    # A mesh that does not span the process group: refused on every rank, nothing run.
    own = [dist.new_group([0]), dist.new_group([1])][rank]
    mesh = dist.device_mesh.DeviceMesh.from_group(own, "cpu")
    torch.manual_seed(0)
    alone = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    fully_shard(alone, mesh=mesh)
    try:
        bf.find_batch_size(alone, _data(), loss_fn=nn.MSELoss(), device=device)
        report["mesh"] = "accepted"
    except ValueError as exc:
        report["mesh"] = str(exc)

    # Clipping sharded gradients all-reduces their norm through DTensor's functional collectives: a round first.
    model, _ = _trained(_model(4))
    checkpoints = CollectiveCheckpoints(RankAgreement())
    with checkpoints.trial(8) as fitted:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        fitted[0] = True
    report["clip_rounds"] = checkpoints.rounds
    checkpoints.agreement.close()

    model, optimizer = _trained(_model(4))
    if rank == FAILING:
        _faulty(model, optimizer)
    before = _state(model, optimizer)

    def attempt(size: int) -> Any:
        started = time.perf_counter()
        try:
            trial = bf.try_batch_size(model, _data(), size, optimizer=optimizer, loss_fn=nn.MSELoss(), device=device)
            outcome: Any = (trial.fits, trial.error)
        except BaseException as exc:  # noqa: BLE001 - what each rank ended with is the result
            outcome = (type(exc).__name__, (str(exc).splitlines() or [""])[0])
        return outcome, time.perf_counter() - started

    for phase in PHASES:
        # After the out-of-memory trial the next one's model check (a full step) runs: FSDP2's state was
        # recovered; after the error, a trial that fits.
        for kind in ("oom", "error"):
            _ARMED = (phase, kind) if rank == FAILING else None
            report[(phase, kind)] = attempt(64)
            _ARMED = None
        report[(phase, "after")] = attempt(8)
    _ARMED = ("forward_after_unshard", "interrupt") if rank == FAILING else None
    report["interrupt"] = attempt(64)
    _ARMED = None
    report["restored"] = _same(before, _state(model, optimizer))
    reference, reference_optimizer = _trained(_model(4))
    report["losses"] = (_step_loss(model, optimizer), _step_loss(reference, reference_optimizer))
    return report


@pytest.mark.slow
def test_a_fault_on_one_rank_at_any_phase_ends_every_rank_with_its_state_restored(two_ranks):
    results = {rank: report["faults"] for rank, report in two_ranks.items()}
    good, bad = results[0], results[1]
    for report in results.values():
        assert "device mesh of the ranks" in report["mesh"], report["mesh"]
        assert report["clip_rounds"] == 2  # before the norm's all-reduce, and the one that ends the trial
    for phase in PHASES:
        (fits, error), seconds = good[(phase, "oom")]
        assert fits is False and error == "rank 1 ran out of memory at batch size 64", (phase, error)
        (fits, error), _ = bad[(phase, "oom")]
        assert fits is False and "injected" in error, (phase, error)
        (name, message), seconds = good[(phase, "error")]
        assert name == "RankFailedError" and "rank 1" in message and f"a bug in {phase}" in message, (phase, message)
        assert seconds < ENDS_WITHIN_S
        (name, message), _ = bad[(phase, "error")]
        assert name == "RuntimeError" and f"a bug in {phase}" in message, (phase, message)
        for report in results.values():
            assert report[(phase, "after")][0] == (True, None), (phase, report[(phase, "after")])
    (name, message), seconds = good["interrupt"]
    assert name == "RankFailedError" and "KeyboardInterrupt" in message and seconds < ENDS_WITHIN_S
    assert bad["interrupt"][0][0] == "KeyboardInterrupt"
    for report in results.values():
        assert report["restored"], "weights, optimizer state and RNG must be as before the searches"
        searched, reference = report["losses"]
        assert searched == reference


# -- bad input, on one rank ------------------------------------------------------------------------------------
@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [_local(p) for p in model.parameters()]


def test_a_model_sharded_only_in_part_is_refused_untouched(one_rank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    fully_shard(model[0])  # the blocks, but not the root
    before = _params(model)
    with pytest.raises(ValueError, match=r"some of the model's parameters are sharded .* call fully_shard\(model\)"):
        bf.find_batch_size(model, _data(), loss_fn=nn.MSELoss(), device=bf.SimulatedGPU("1MiB"))
    assert _same(before, _params(model))
    with pytest.raises(ValueError, match="ignored_params"):
        fully_shard(model, ignored_params={model[1].weight})
        check_sharded_model(model)


def test_a_two_dimensional_mesh_is_refused(one_rank):
    mesh = dist.device_mesh.init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    model = nn.Sequential(nn.Linear(8, 8))
    fully_shard(model, mesh=mesh)
    with pytest.raises(ValueError, match="HSDP"):
        bf.try_batch_size(model, _data(), 4, loss_fn=nn.MSELoss(), device=bf.SimulatedGPU("1MiB"))


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp1_and_deepspeed_are_refused_with_what_to_do(one_rank):
    class DeepSpeedEngine(nn.Module):  # stands in for deepspeed's engine (not installed here)
        pass

    with pytest.raises(ValueError, match="DeepSpeed engine.*fully_shard"):
        check_supported_wrapper(DeepSpeedEngine())
    try:
        wrapped = fsdp.FullyShardedDataParallel(nn.Linear(8, 8), device_id=torch.device("cpu"))
    except Exception as exc:  # noqa: BLE001 - FSDP1 may not build on this machine's CPU
        pytest.skip(f"FSDP1 cannot be built here: {exc}")
    with pytest.raises(ValueError, match=r"FSDP1.*fully_shard"):
        bf.find_batch_size(wrapped, _data(), loss_fn=nn.MSELoss(), device=bf.SimulatedGPU("1MiB"))


def test_a_sharded_model_on_one_rank_is_searched_and_charged_by_its_shards(one_rank):
    model = _model(3)
    optimizer = torch.optim.Adam(model.parameters())
    result = bf.find_batch_size(model, _data(), optimizer=optimizer, loss_fn=nn.MSELoss(), device=bf.SimulatedGPU("1MiB", allocator="ideal"))
    assert result.max_batch_size > 8
    with pytest.raises(ValueError, match="mode='guided' predicts .* mode='binsearch'"):
        bf.find_batch_size(model, _data(), loss_fn=nn.MSELoss(), device=bf.SimulatedGPU("1MiB"), mode="guided")
    # A DTensor is charged for its local shard (here the whole tensor: one rank), a resized storage as it shrinks.
    with bf.SimulatedGPU("1MiB", allocator="ideal") as gpu:
        nn.functional.mse_loss(model(torch.randn(4, WIDTH)), torch.randn(4, WIDTH)).backward()
        after_backward = gpu.memory_allocated()
    grads = sum(p.grad.to_local().numel() * 4 for p in model.parameters())
    assert after_backward >= grads
    assert after_backward < 2 * grads + 8 * 4 * WIDTH * 4  # the gathered parameters were released


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_reset_returns_every_unit_to_idle_after_a_step_stopped_midway(one_rank, where):
    model, reference = _model(3), _model(3)
    x, y = _data().tensors

    def fail(*args: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    # forward: after model[1]'s unshard (FSDP's pre-hook runs first); backward: after model[2] and model[1]'s.
    handle = (
        model[1].register_forward_pre_hook(fail) if where == "forward" else model[0].register_full_backward_pre_hook(fail)
    )
    with pytest.raises(torch.OutOfMemoryError):
        nn.functional.mse_loss(model(x[:8]), y[:8]).backward()
    handle.remove()
    state = model._get_fsdp_state()

    def idle() -> bool:
        groups = [g for s in state._state_ctx.all_states for g in s._fsdp_param_groups]
        return (
            all(s._training_state.name == "IDLE" for s in state._state_ctx.all_states)
            and all(g._training_state.name == "IDLE" and g._sharded_state.name == "SHARDED" for g in groups)
            and state._state_ctx.iter_forward_root is None
            and not state._state_ctx.post_backward_final_callback_queued
            and all(_is_sharded(p) for p in model.parameters())
        )

    assert not idle()  # FSDP2's state after the exception, as Composer found it
    reset_sharded_state(model)
    assert idle()
    for p in model.parameters():
        p.grad = None  # the failed step's sharded gradients (a trial's restore drops them)
    optimizers = [torch.optim.Adam(m.parameters()) for m in (model, reference)]
    assert _step_loss(model, optimizers[0]) == _step_loss(reference, optimizers[1])
    assert all(torch.equal(_local(a), _local(b)) for a, b in zip(model.parameters(), reference.parameters()))
