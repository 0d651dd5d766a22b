"""Faults on one of two ranks: every rank ends within seconds, none waits for the other.

Two CPU processes over gloo search the same model on simulated GPUs; rank 1 fails at one point of the search (a
bad argument or keyword, the data scan, the probe, a trial, the confirmation, Ctrl-C, ``sys.exit``) and stays alive,
or exits, or hangs. Rank 1 must end with its own error, rank 0 with :class:`~batchfinder.RankFailedError` naming
rank 1 and that error, both within seconds and with the user's model, optimizer and RNG as they were. Every run is
bounded: a rank still alive after the join timeout is killed and the test fails, so a hang fails the test instead of
hanging CI.

The workers are module-level functions (start method "spawn"); they report through a queue and never raise.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

import batchfinder as bf
import batchfinder.engine.run as engine_run
from batchfinder.engine.ranks import TIMEOUT_VARIABLE, RankAgreement, agreeing_ranks
from tests.helpers import as_lightning_rank, classification_data, free_port

JOIN_TIMEOUT_S = 180  # the whole run of one test's processes (a hang is killed and fails the test)
ENDS_WITHIN_S = 30  # each faulty search, on each rank
FAILING = 1
HANG_TIMEOUT_S = 3


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


class _Unreadable(Dataset):
    """A dataset whose reads fail with OSError on the failing rank (a file that went away)."""

    def __init__(self, data: Any, fails: bool) -> None:
        self.data, self.fails = data, fails

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        if self.fails:
            raise OSError(f"[Errno 5] Input/output error reading sample {index}")
        return self.data[index]


_IN_CONFIRMATION = False


def _confirming(*args: Any, **kwargs: Any) -> Any:
    """Stands in for the engine's ``confirm`` on the failing rank: the step knows it is in the confirmation."""
    global _IN_CONFIRMATION
    _IN_CONFIRMATION = True
    try:
        return _REAL_CONFIRM(*args, **kwargs)
    finally:
        _IN_CONFIRMATION = False


_REAL_CONFIRM = engine_run.confirm


def _step(fault: str | None) -> Any:
    """The training step, with ``fault`` injected into it (None: a plain step)."""

    def step(model: nn.Module, batch: Any) -> torch.Tensor:
        large = len(batch[0]) > 40  # from the third trial on (16, 32, 64, ...)
        if fault == "probe":
            raise ValueError("the model rejects this input on rank 1")
        if fault == "trial" and large:
            raise KeyError("a bug on rank 1 only")
        if fault == "confirmation" and _IN_CONFIRMATION:
            raise RuntimeError("the step broke in the confirmation")
        if fault == "interrupt" and large:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered as KeyboardInterrupt at the next bytecode
            time.sleep(1)
        if fault == "exit_code" and large:
            sys.exit(3)
        if fault == "exit" and large:
            os._exit(7)  # the process ends at once: no exception, no report
        if fault == "hang" and large and not getattr(step, "slept", False):
            step.slept = True  # type: ignore[attr-defined]
            time.sleep(8)
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    return step


# The faults that leave the failing process alive, and the error it raises.
ALIVE = {
    "bad_argument": "ValueError",
    "unknown_keyword": "TypeError",
    "scan": "OSError",
    "probe": "ValueError",
    "trial": "KeyError",
    "confirmation": "RuntimeError",
    "interrupt": "KeyboardInterrupt",
    "exit_code": "SystemExit",
}


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [t.detach().clone() for t in model.state_dict().values()]
    for state in optimizer.state.values():
        tensors += [v.clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return [*tensors, torch.get_rng_state()]


def _search(rank: int, fault: str | None) -> dict[str, Any]:
    """One search with ``fault`` injected on the failing rank: how it ended, how long it took, whether the user's
    model, optimizer and RNG are as they were."""
    fails = rank == FAILING and fault is not None
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 32)).sum().backward()
    optimizer.step()  # an optimizer with state, which must survive the search
    optimizer.zero_grad()
    before = _state(model, optimizer)
    data = classification_data(1024, (32,), 4)
    kwargs: dict[str, Any] = dict(optimizer=optimizer, device="sim:64MiB", step_fn=_step(fault if fails else None))
    if fails and fault == "bad_argument":
        kwargs["safety"] = 1.5
    if fails and fault == "unknown_keyword":
        kwargs["safty"] = 0.5  # refused by Python itself, before the function's body runs
    if fault == "scan":
        data = _Unreadable(data, fails)
    engine_run.confirm = _confirming if fails and fault == "confirmation" else _REAL_CONFIRM
    started = time.perf_counter()
    try:
        result = bf.find_batch_size(model, data, **kwargs)
        outcome, ranks, errors = f"returned {result.batch_size}", None, None
    except BaseException as exc:  # the outcome is what the test checks
        outcome = f"{type(exc).__name__}: {exc}"
        ranks, errors = getattr(exc, "ranks", None), getattr(exc, "errors", None)
    seconds = time.perf_counter() - started
    after = _state(model, optimizer)
    unchanged = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    return dict(outcome=outcome, ranks=ranks, errors=errors, seconds=seconds, unchanged=unchanged)


def _worker(rank: int, world: int, port: int, queue: Any, faults: list[str | None]) -> None:
    try:
        torch.set_num_threads(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt, as in a shell
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        try:
            for fault in faults:
                # A wait past this limit fails the checks below instead of hanging (3 s where the test is the limit).
                os.environ[TIMEOUT_VARIABLE] = str(HANG_TIMEOUT_S if fault == "hang" else 20)
                dist.barrier()  # both ranks start each search together (the default group: not the search's own)
                queue.put((rank, fault, _search(rank, fault)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported, not raised
        queue.put((rank, "worker", traceback.format_exc()))


def _spawn(faults: list[str | None], worker: Any = None) -> tuple[dict[tuple[int, str | None], Any], list[Any]]:
    """Run ``faults`` one after the other on two ranks (with ``worker``, by default :func:`_worker`); what each rank
    reported per fault, and the exit codes."""
    worker = worker or _worker
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, 2, port, queue, faults), daemon=True) for rank in range(2)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
    results: dict[tuple[int, str | None], Any] = {}
    while not queue.empty():
        rank, fault, value = queue.get()
        assert fault != "worker", f"rank {rank} failed outside the searches:\n{value}"
        results[(rank, fault)] = value
    assert not hung, f"rank(s) {hung} hung (still running after {JOIN_TIMEOUT_S} s); got {results}"
    return results, [p.exitcode for p in processes]


@pytest.fixture(scope="module")
def runs() -> tuple[dict[tuple[int, str | None], Any], list[Any]]:
    """Every fault, one after the other on the same two processes (starting processes is what takes time): those
    that leave rank 1 alive, a plain search (the ranks still agree after them), a rank that does not answer in time,
    and last a rank that exits."""
    return _spawn([*ALIVE, None, "hang", "exit"])


def test_a_rank_that_fails_and_stays_alive_stops_every_rank_within_seconds(runs: Any) -> None:
    results, _ = runs
    for fault, error in ALIVE.items():
        failing, healthy = results[(FAILING, fault)], results[(0, fault)]
        # The failing rank raises its own error; the other stops with RankFailedError naming rank 1 and that error.
        assert failing["outcome"].startswith(f"{error}"), (fault, failing)
        assert healthy["outcome"].startswith("RankFailedError: rank 1 failed"), (fault, healthy)
        assert healthy["ranks"] == [1] and healthy["errors"][1].startswith(error), (fault, healthy)
        for rank in (0, 1):
            assert results[(rank, fault)]["seconds"] < ENDS_WITHIN_S, (fault, rank, results[(rank, fault)])
            assert results[(rank, fault)]["unchanged"], (fault, rank)
    assert "safety" in results[(0, "bad_argument")]["errors"][1]
    assert "safty" in results[(0, "unknown_keyword")]["errors"][1]
    assert "Input/output error" in results[(0, "scan")]["outcome"]
    assert "(at batch size 64)" in results[(0, "trial")]["errors"][1]  # where it failed, from the failing rank
    assert "the confirmation at batch size" in results[(0, "confirmation")]["outcome"]
    assert results[(0, None)]["outcome"] == results[(1, None)]["outcome"]
    assert results[(0, None)]["outcome"].startswith("returned")


def test_a_rank_that_does_not_answer_in_time_is_named_by_the_others(runs: Any) -> None:
    results, _ = runs
    healthy, slow = results[(0, "hang")], results[(FAILING, "hang")]
    assert healthy["outcome"].startswith(f"RankFailedError: rank 1 did not answer within {HANG_TIMEOUT_S} s"), healthy
    assert "it may have exited or hung" in healthy["outcome"] and healthy["ranks"] == [1]
    assert healthy["seconds"] < ENDS_WITHIN_S and healthy["unchanged"]
    # The slow rank finds the other gone when it comes back, and stops as well.
    assert slow["outcome"].startswith("RankFailedError: rank 0"), slow
    assert slow["seconds"] < ENDS_WITHIN_S and slow["unchanged"]


def test_a_rank_that_exits_mid_search_is_named_by_the_others(runs: Any) -> None:
    results, exitcodes = runs
    assert exitcodes == [0, 7] and (FAILING, "exit") not in results
    healthy = results[(0, "exit")]
    expected = "RankFailedError: rank 1 exited, left the search or lost its connection"
    assert healthy["outcome"].startswith(expected), healthy
    assert healthy["ranks"] == [1] and healthy["seconds"] < ENDS_WITHIN_S and healthy["unchanged"]


# -- one process ------------------------------------------------------------------------------------------------------
@pytest.fixture
def one_rank() -> Any:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_rank_that_cannot_open_the_cpu_group_says_why(one_rank: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("[gloo/transport/tcp/pair.cc:799] Connect timeout [10.0.0.2]:29500")

    monkeypatch.setattr(dist, "new_group", refused)
    with pytest.raises(bf.BatchFinderError, match=r"rank 0 could not open the CPU \(gloo\) process group") as info:
        RankAgreement()
    assert "Connect timeout" in str(info.value) and "distributed=False" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_the_time_limit_comes_from_the_environment(one_rank: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIMEOUT_VARIABLE, "2.5")
    agreement = RankAgreement()
    assert agreement.timeout_s == 2.5
    agreement.close()
    monkeypatch.setenv(TIMEOUT_VARIABLE, "soon")
    with pytest.raises(ValueError, match=f"{TIMEOUT_VARIABLE}='soon' must be a positive number of seconds"):
        RankAgreement()


def test_the_guard_reports_any_exception_and_is_shared_by_nested_blocks(one_rank: Any) -> None:
    with pytest.raises(KeyboardInterrupt):
        with agreeing_ranks(True) as outer:
            assert outer is not None
            with agreeing_ranks(None) as inner:
                assert inner is outer  # the engine's block shares the front end's agreement
            raise KeyboardInterrupt
    assert outer.ended and outer.group is None  # reported (one rank: to itself) and closed
    with agreeing_ranks(None) as none:
        assert none is None  # one rank and no insistence: nothing to agree on


def test_ranks_that_never_join_are_told_apart_from_a_network_problem(
    one_rank: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def waited(*args: Any, **kwargs: Any) -> Any:
        raise dist.DistStoreError("wait timeout after 600000ms, keys: /default_pg/0//1//cpu//0/1")

    monkeypatch.setattr(dist, "new_group", waited)
    with pytest.raises(bf.BatchFinderError, match=r"the other ranks did not join rank 0 within 600 s") as info:
        RankAgreement()
    assert "every rank must call the search" in str(info.value) and TIMEOUT_VARIABLE in str(info.value)


# -- Lightning's DDP strategy ----------------------------------------------------------------------------------------
def _lightning_worker(rank: int, world: int, port: int, queue: Any, faults: list[str | None]) -> None:
    try:
        as_lightning_rank(rank, world, port)
        os.environ[TIMEOUT_VARIABLE] = "20"
        import pytorch_lightning as pl

        from batchfinder.lightning import BatchFinder

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.batch_size = 8
                self.net = _mlp()

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                if rank == FAILING and len(batch[0]) > 40:
                    raise KeyError("a bug in training_step on rank 1")
                return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

            def configure_optimizers(self) -> Any:
                return torch.optim.Adam(self.parameters())

            def train_dataloader(self) -> Any:
                return torch.utils.data.DataLoader(classification_data(1024, (32,), 4), batch_size=self.batch_size)

        module = Module()
        before = [p.detach().clone() for p in module.parameters()]
        trainer = pl.Trainer(callbacks=[BatchFinder(device="sim:64MiB")], strategy="ddp", accelerator="cpu",
                             devices=world, max_steps=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False)
        started = time.perf_counter()
        try:
            trainer.fit(module)
            outcome = "returned"
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        unchanged = all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
        queue.put((rank, "trial", dict(outcome=outcome, seconds=time.perf_counter() - started, unchanged=unchanged)))
    except BaseException:
        queue.put((rank, "worker", traceback.format_exc()))


def test_lightning_ddp_ranks_stop_when_one_fails_in_a_trial() -> None:
    pytest.importorskip("pytorch_lightning")
    results, _ = _spawn(["trial"], worker=_lightning_worker)
    failing, healthy = results[(FAILING, "trial")], results[(0, "trial")]
    assert failing["outcome"].startswith("KeyError"), failing
    assert healthy["outcome"].startswith("RankFailedError: rank 1 failed (KeyError: a bug in training_step"), healthy
    for value in (failing, healthy):
        assert value["seconds"] < ENDS_WITHIN_S and value["unchanged"], value
