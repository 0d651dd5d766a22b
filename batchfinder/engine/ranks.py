"""How the ranks of a distributed search agree, and how a failure on one rank reaches the others.

When ``torch.distributed`` is initialised, every rank runs the same search, and :class:`RankAgreement` keeps them in
lock step: before each trial they agree on the size to try and on whether to stop, after it on the outcome (a size
fits only if it fitted on every rank; see :mod:`batchfinder.engine.distributed`).

Every collective of the agreement is the same **exchange**: an all-reduce over a CPU (gloo) group of one fixed-size
record per rank, holding whether that rank is well, the exchange's number, a few numbers of payload and, from a rank
that failed, its error's type and first line. Whatever exchange a rank waits in, a failure record from another rank
matches it. That makes failure agreement hold by construction:

* a front end opens the agreement first (:func:`agreeing_ranks`), before it checks an argument or scans the data,
  and every exception leaving the block (``KeyboardInterrupt``, ``SystemExit`` and any other ``BaseException``
  included) is sent as a failure record at the next exchange, after which the failing rank raises its own error;
* a rank that learns of another's failure at an exchange raises :class:`~batchfinder.RankFailedError` naming the
  failing rank and its error, and takes part in no further exchange;
* the block ends with one last exchange, so that a failure after a rank's last trial (in the confirmation, or in a
  front end applying the result) reaches every rank as well.

A rank that exits (``os._exit``, a crash, a kill) closes its connections: the others raise ``RankFailedError`` at
their next exchange, naming it. A rank that hangs is waited for at most :data:`DEFAULT_TIMEOUT_S` seconds (the
environment variable ``BATCHFINDER_RANK_TIMEOUT`` sets another limit), then the others raise ``RankFailedError``.
The exchange runs on a gloo group of the agreement's own, created with that time limit: a collective on a GPU would
run on whichever device is current, and after an illegal memory access the failing rank's CUDA context could not
report anything.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import enum
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from ..errors import BatchFinderError, RankFailedError, exception_first_line

__all__ = [
    "RankAgreement",
    "resolve_agreement",
    "agreeing_ranks",
    "agrees_across_ranks",
    "active_agreement",
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_VARIABLE",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
"""How long a rank waits for the others at one exchange (a trial, the data scan or the probe on the slowest rank)."""
TIMEOUT_VARIABLE = "BATCHFINDER_RANK_TIMEOUT"
"""The environment variable that sets another time limit, in seconds."""

_F = TypeVar("_F", bound=Callable[..., Any])

_OK, _FAILED = 1, 2  # a record's status (0 would be a record that no rank filled)
_IN_TRIAL, _LEFT = 3, 4  # a record's status in the rounds inside a trial of a sharded model (trial_round)
_PAYLOAD = 4  # numbers an exchange carries per rank
_MESSAGE_BYTES = 200  # the failing rank's "Type: first line", UTF-8, cut to this length
_HEADER = 2 + _PAYLOAD + 1  # status, exchange number, payload, message length
_WIDTH = _HEADER + _MESSAGE_BYTES

_ACTIVE: contextvars.ContextVar[RankAgreement | None] = contextvars.ContextVar("batchfinder_agreement", default=None)


def _distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_VARIABLE}={text!r} must be a positive number of seconds")
    return value


def _describe(exc: BaseException) -> str:
    """``Type: first line`` of ``exc`` (and the batch size it happened at, when batchfinder's note says so)."""
    first = exception_first_line(exc)
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    size = getattr(exc, "batchfinder_batch_size", None)
    return f"{text} (at batch size {size})" if isinstance(size, int) else text


class RankAgreement:
    """Agreement between the ranks of a process group during a search (see the module documentation).

    Every method is an exchange: every rank of ``group`` must call the same methods in the same order, which the
    search loop guarantees because each call depends only on values the ranks already agreed on; a rank that failed
    calls :meth:`report_failure` instead, which matches whatever exchange the others wait in.
    """

    def __init__(self, group: Any = None, *, timeout_s: float | None = None) -> None:
        if not _distributed_ready():
            raise RuntimeError("torch.distributed is not initialised: there are no ranks to agree with")
        dist = torch.distributed
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout_s = float(timeout_s) if timeout_s is not None else _timeout_s()
        ranks = None if group is None else dist.get_process_group_ranks(group)
        try:
            self.group: Any = dist.new_group(
                ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s)
            )
        except Exception as exc:
            store_error = getattr(dist, "DistStoreError", ())
            if isinstance(exc, store_error) and "timeout" in exception_first_line(exc).lower():  # a rank never came
                raise BatchFinderError(
                    f"the other ranks did not join rank {self.rank} within {self.timeout_s:g} s to agree on the batch "
                    f"size ({_describe(exc)}): every rank must call the search, and with the same distributed "
                    f"argument (the limit is the environment variable {TIMEOUT_VARIABLE}, in seconds)"
                ) from exc
            raise BatchFinderError(
                f"rank {self.rank} could not open the CPU (gloo) process group the ranks agree over "
                f"({_describe(exc)}). The ranks exchange a few bytes over TCP between trials, with gloo, whatever "
                "backend training uses: make sure gloo can connect the ranks (on a cluster where only NCCL can, set "
                "GLOO_SOCKET_IFNAME to a network interface the ranks share), or pass distributed=False to let each "
                "rank search on its own (each may then find a different size)"
            ) from exc
        self._device = torch.device("cpu")
        self._exchanges = 0
        self._ended = False
        self._last: torch.Tensor | None = None

    @property
    def ended(self) -> bool:
        """True once an exchange failed or told of a failure: no rank takes part in another one."""
        return self._ended

    def close(self) -> None:
        """Release the agreement's gloo group (local: no rank waits for another here)."""
        self._ended = True
        if self.group is not None:
            group, self.group = self.group, None
            torch.distributed.destroy_process_group(group)

    # -- the exchange ---------------------------------------------------------------------------------------------
    def _others(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    def _name_others(self) -> str:
        others = self._others()
        return f"rank {others[0]}" if len(others) == 1 else f"one of the ranks {others}"

    def _all_reduce(self, record: list[int], what: str) -> list[list[int]]:
        """Every rank's record: an all-reduce (sum) of a vector in which each rank fills its own row. A peer that
        exited or did not answer in time becomes :class:`RankFailedError`."""
        if self._ended or self.group is None:
            raise RuntimeError(f"the ranks' agreement has ended; {what} cannot be agreed on (a bug in batchfinder)")
        vector = torch.zeros(self.world_size * _WIDTH, dtype=torch.int64, device=self._device)
        vector[self.rank * _WIDTH : (self.rank + 1) * _WIDTH] = torch.tensor(record, dtype=torch.int64)
        self._last = vector  # filled with every rank's record once the all-reduce returns (see report_failure)
        try:
            torch.distributed.all_reduce(vector, op=torch.distributed.ReduceOp.SUM, group=self.group)
        except RuntimeError as exc:
            self._ended = True
            raise self._transport_error(exc, what) from exc
        self._exchanges += 1
        flat = vector.tolist()
        return [flat[r * _WIDTH : (r + 1) * _WIDTH] for r in range(self.world_size)]

    def _transport_error(self, exc: RuntimeError, what: str) -> RankFailedError:
        # gloo's text, without its source location and advice: "Connection closed by peer [10.0.0.2]:41234".
        text = re.sub(r"^\[[^\]]*\]\s*", "", exception_first_line(exc)).split(". ")[0].rstrip(".")
        others = self._others()
        ranks = others if len(others) > 1 else others[:1]
        if "timed out" in text.lower() or "timeout" in text.lower():
            return RankFailedError(
                f"{self._name_others()} did not answer within {self.timeout_s:g} s at {what}: it may have exited or "
                f"hung; rank {self.rank} stops as well (the limit is the environment variable {TIMEOUT_VARIABLE}, in "
                "seconds)",
                ranks=ranks,
            )
        return RankFailedError(
            f"{self._name_others()} exited, left the search or lost its connection (gloo: {text}); rank {self.rank} "
            f"learned it at {what} and stops as well (see the other rank's log for why it ended)",
            ranks=ranks,
        )

    def _record(self, status: int, values: Sequence[int], message: str = "") -> list[int]:
        payload = [int(v) for v in values] + [0] * (_PAYLOAD - len(values))
        data = message.encode("utf-8")[:_MESSAGE_BYTES]
        return [status, self._exchanges, *payload, len(data), *data, *[0] * (_MESSAGE_BYTES - len(data))]

    def exchange(self, values: Sequence[int], what: str) -> list[list[int]]:
        """Every rank's ``values`` (at most four numbers), after every rank got through ``what``.

        Raises :class:`RankFailedError` when another rank failed (it sent a failure record), exited, did not answer
        within the time limit, or is not at the same exchange (the ranks ran different searches).
        """
        if len(values) > _PAYLOAD:
            raise ValueError(f"an exchange carries at most {_PAYLOAD} numbers per rank")
        rows = self._all_reduce(self._record(_OK, values), what)
        self._raise_failures(rows, (_OK,), what)
        numbers = {row[1] for row in rows}
        if len(numbers) > 1:
            self._ended = True
            raise RankFailedError(
                f"the ranks are out of step at {what} (exchanges {sorted(numbers)}): every rank must run the same "
                "search, with the same arguments, and call it the same number of times",
                ranks=[r for r, row in enumerate(rows) if row[1] != rows[self.rank][1]],
            )
        return [row[2 : 2 + len(values)] for row in rows]

    def trial_round(self, left: bool, values: Sequence[int], what: str) -> list[tuple[bool, list[int]]]:
        """One round inside a trial of a sharded model (:mod:`batchfinder.engine.sharded`): every rank's
        ``(left, values)``, where ``left`` says that the rank has left its trial. Rounds are exchanges like the
        others (one all-reduce each, so every rank runs the same number of them and the exchange numbers stay
        aligned), but a rank still in its trial and one that left it may meet in one: that is the point. Raises
        :class:`RankFailedError` when another rank failed, exited or did not answer."""
        if len(values) > _PAYLOAD:
            raise ValueError(f"a round carries at most {_PAYLOAD} numbers per rank")
        rows = self._all_reduce(self._record(_LEFT if left else _IN_TRIAL, values), what)
        self._raise_failures(rows, (_IN_TRIAL, _LEFT), what)
        return [(row[0] == _LEFT, row[2 : 2 + len(values)]) for row in rows]

    def _raise_failures(self, rows: list[list[int]], well: tuple[int, ...], what: str) -> None:
        failed = {r: _message(row) for r, row in enumerate(rows) if row[0] not in well}
        if failed:
            self._ended = True
            if len(failed) == 1:
                told = next(iter(failed.values())) or "an error"
            else:
                told = "; ".join(f"rank {r}: {message or 'an error'}" for r, message in sorted(failed.items()))
            raise RankFailedError(
                f"{_ranks_text(sorted(failed))} failed ({told}); rank {self.rank} learned it at {what} and stops as "
                "well so that no rank waits for the others (the failing rank raises its own error)",
                ranks=sorted(failed),
                errors=failed,
            )

    def report_failure(self, exc: BaseException) -> None:
        """Tell the other ranks that this one failed with ``exc`` (at the exchange they wait in), so that they raise
        :class:`RankFailedError` instead of waiting; the caller then raises ``exc``. Does nothing when the agreement
        has ended already (``exc`` came from an exchange, or followed one); never raises for a peer that is gone."""
        if self._ended or self.group is None:
            return
        if self._last is not None:
            # Ctrl-C is delivered when the all-reduce returns, so it may land before this rank read the last exchange:
            # if another rank reported a failure there, it has stopped and listens no more.
            flat = self._last.tolist()
            if any(flat[r * _WIDTH] == _FAILED for r in self._others()):
                self._ended = True
                return
        try:
            self._all_reduce(self._record(_FAILED, (), _describe(exc)), "the report of this rank's failure")
        except RankFailedError as gone:
            logger.debug("rank %d could not report its failure to the others: %s", self.rank, gone)
        else:
            logger.info("rank %d told the other ranks that it failed (%s)", self.rank, _describe(exc))
        self._ended = True

    # -- what the search agrees on --------------------------------------------------------------------------------
    def check(self, what: str) -> None:
        """Agree that every rank got through ``what`` (:class:`RankFailedError` when one did not)."""
        self.exchange((), what)

    def any(self, flag: bool, what: str = "a check of the data") -> bool:
        """True when ``flag`` is true on any rank."""
        return any(row[0] for row in self.exchange((int(bool(flag)),), what))

    def smallest(self, values: Sequence[int | None], what: str = "the memory budgets") -> list[int | None]:
        """Each of ``values``, the smallest over the ranks (None where every rank has None): what every rank then
        uses, e.g. the guided mode's memory budget, which differs by a few MiB between real GPUs."""
        unset = 2**62
        rows = self.exchange([unset if v is None else int(v) for v in values], what)
        least = [min(column) for column in zip(*rows)]
        return [None if v == unset else v for v in least]

    def agree_next(
        self, size: int | None, stop: enum.Enum | None, reasons: Sequence[enum.Enum]
    ) -> tuple[int | None, enum.Enum | None]:
        """Agree on the next batch size (None: the search is over) and on whether a budget stops the search.

        ``reasons`` lists the stop reasons a rank may bring (their position is their code); the first one any rank
        brings wins. Raises :class:`RankFailedError` when the ranks' strategies proposed different sizes.
        """
        code = 0 if stop is None else list(reasons).index(stop) + 1
        rows = self.exchange([0 if size is None else size, code], "the choice of the next batch size")
        sizes = {row[0] for row in rows}
        codes = [row[1] for row in rows if row[1]]
        if codes:
            return size, reasons[min(codes) - 1]
        if len(sizes) > 1:
            self._ended = True  # every rank raises this, from the same agreed values
            raise RankFailedError(
                f"the ranks proposed different batch sizes ({sorted(sizes)}); every rank must search the same model "
                "with the same arguments"
            )
        return size, None

    def agree_outcome(self, fits: bool, peak_bytes: int, what: str) -> tuple[bool, int, list[int]]:
        """Agree on a trial's outcome: it fits only when it fitted on every rank; the peak is the largest.

        Returns ``(fits, peak_bytes, ranks_out_of_memory)``.
        """
        rows = self.exchange([int(bool(fits)), int(peak_bytes)], what)
        out_of_memory = [r for r, row in enumerate(rows) if not row[0]]
        return not out_of_memory, max(row[1] for row in rows), out_of_memory

    def agree_trial(self, trial: Any, what: str) -> tuple[Any, int]:
        """The :class:`~batchfinder.result.Trial` with the agreed ``fits`` (this rank's peaks and timings kept), and
        the largest reserved peak over the ranks."""
        fits, peak, out_of_memory = self.agree_outcome(trial.fits, trial.peak_reserved_bytes, what)
        if fits == trial.fits:
            return trial, peak
        others = [r for r in out_of_memory if r != self.rank]
        return (
            dataclasses.replace(
                trial,
                fits=False,
                seconds_per_step=None,
                error=f"out of memory on rank(s) {others} (this rank, {self.rank}, fitted)",
            ),
            peak,
        )

    def __repr__(self) -> str:
        return f"RankAgreement(rank={self.rank}, world_size={self.world_size}, timeout_s={self.timeout_s:g})"


def _message(row: list[int]) -> str:
    length = max(0, min(row[_HEADER - 1], _MESSAGE_BYTES))
    return bytes(b & 0xFF for b in row[_HEADER : _HEADER + length]).decode("utf-8", errors="ignore")


def _ranks_text(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


def active_agreement() -> RankAgreement | None:
    """The agreement of the :func:`agreeing_ranks` block this code runs in (None outside one, or without ranks)."""
    return _ACTIVE.get()


def resolve_agreement(distributed: bool | None) -> RankAgreement | None:
    """The agreement a search uses: with ``None`` (automatic) one when ``torch.distributed`` is initialised with
    several ranks, ``True`` to insist on it, ``False`` for none (each rank searches on its own, e.g. when only one
    rank searches). Any other value opens one as well when there are ranks, so that the search's own check of its
    arguments, which refuses it, reaches the other ranks."""
    if distributed is False:
        return None
    if not _distributed_ready():
        if distributed is True:
            raise ValueError("distributed=True but torch.distributed is not initialised (call init_process_group first)")
        if distributed is not None:
            raise TypeError(f"distributed must be True, False or None (automatic), not {type(distributed).__name__}")
        return None
    if torch.distributed.get_world_size() == 1 and distributed is not True:
        return None
    return RankAgreement()


@contextlib.contextmanager
def agreeing_ranks(distributed: bool | None) -> Iterator[RankAgreement | None]:
    """The block in which the ranks of a search agree; every front end opens it before it does anything that can
    fail on one rank (checking its arguments, scanning the data).

    Yields the :class:`RankAgreement` (``None`` without ranks to agree with). An exception leaving the block (any
    ``BaseException``: ``KeyboardInterrupt`` and ``SystemExit`` too) is reported to the other ranks before it
    propagates, so that they raise :class:`RankFailedError` instead of waiting; the block ends with one last
    exchange (every rank got through it), then the agreement's group is released. Nested blocks (a front end's, then
    the engine's) share the outer one's agreement, and the outer block reports and closes it.
    """
    active = _ACTIVE.get()
    if active is not None:
        yield active
        return
    agreement = resolve_agreement(distributed)
    if agreement is None:
        yield None
        return
    token = _ACTIVE.set(agreement)
    try:
        try:
            yield agreement
        except BaseException as exc:
            agreement.report_failure(exc)
            raise
        agreement.check("the end of the search")
    finally:
        _ACTIVE.reset(token)
        agreement.close()


def agrees_across_ranks(front_end: _F) -> _F:
    """Run every call of ``front_end`` (a function with a keyword-only ``distributed`` argument, default ``None``)
    inside :func:`agreeing_ranks`, from before its arguments are bound: even a call it refuses (an unknown keyword,
    a bad value) reaches the other ranks."""

    @functools.wraps(front_end)
    def agreeing(*args: Any, **kwargs: Any) -> Any:
        with agreeing_ranks(kwargs.get("distributed")):
            return front_end(*args, **kwargs)

    return agreeing  # type: ignore[return-value]
