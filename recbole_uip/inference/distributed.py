"""Profile inference across processes with ``torch.distributed``: who holds which users, and the collectives.

Launched with ``torchrun --nproc_per_node=N -m recbole_uip infer ...`` (one node or several), each process (rank)
holds every user's history but works on a contiguous block of users (:meth:`Communicator.shard`): it embeds its
share of the items, computes its users' encoder inputs and offsets, and runs the M-step on its users. What must
be the same on every rank is combined with collectives:

* the item embeddings are summed (each rank computes every ``W``-th of the single process's batches, the other rows
  zero: bit for bit the single process's, in bfloat16 too), the users' encoder inputs ``z (U, k)`` gathered (small:
  ``k`` is 8 by default);
* the feature map's and the quantiser's statistics (means, covariances, k-means sums and counts) are summed, so
  every rank assigns with the same codebooks; k-means++ and dead-code restarts sample a user by inverse CDF over
  the ranks' blocks in user order, with the same random draw on every rank;
* the shared shift's gradient is averaged over the ranks at each M-step batch and the encoder's accumulated
  gradient is summed before its line search (the standard all-reduce of gradients; the trainable parts are a few
  tensors, so a DDP wrapper would add nothing).

A single process is the same code with a :class:`Communicator` of one rank, whose collectives return their input.
Rank 0 alone writes the bank and the atomic files (:func:`recbole_uip.quick_start.infer_profiles`).

The backend is ``gloo`` on CPU and ``nccl`` on CUDA. A collective that fails because another rank stopped (a
crash, a kill) raises :class:`DistributedInferenceError` with the phase, instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch


class DistributedInferenceError(RuntimeError):
    """Another rank stopped (or failed) during distributed profile inference; this rank stops too."""


class Communicator:
    """The ranks of one profile inference.

    Args:
        rank: this process's rank; world_size: the number of processes.
        device: where collectives run (``cuda`` for ``nccl``, ``cpu`` for ``gloo``); None: the world of one.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        self.phase = "start-up"               # what the ranks are doing, for the message when one stops

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # ---------------------------------------------------------------------------------------------- shards
    def bounds(self, n: int) -> list[int]:
        """Block boundaries of ``n`` rows over the ranks: rank ``r`` holds rows ``[b[r], b[r + 1])``."""
        return [n * r // self.world_size for r in range(self.world_size + 1)]

    def shard(self, n: int) -> np.ndarray:
        """int64 ``(n_r,)``: the rows of ``n`` that this rank holds (a contiguous block, in order)."""
        b = self.bounds(n)
        return np.arange(b[self.rank], b[self.rank + 1], dtype=np.int64)

    def locate(self, index: int, n: int) -> tuple[int, int]:
        """``(owner rank, row within its block)`` of row ``index`` of ``n`` under :meth:`bounds`."""
        b = self.bounds(n)
        owner = int(np.searchsorted(b, index, side="right")) - 1
        return owner, index - b[owner]

    # ----------------------------------------------------------------------------------------- collectives
    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except DistributedInferenceError:
            raise
        except Exception as error:  # noqa: BLE001 - a peer's exit surfaces as any of gloo's/nccl's errors
            raise DistributedInferenceError(
                f"UIP inference, {self.describe()}: another rank stopped during {self.phase} ({what}: "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}). This rank stops too; "
                f"nothing was published. See the first failing rank's message above.") from error

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over the ranks (same shape on every rank); a new tensor on the
        input's device. One rank: ``tensor`` itself."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        with self._collective("all-reduce"):
            work = tensor.detach().to(self.device).clone()
            dist.all_reduce(work)
        return work.to(tensor.device)

    def count(self, local_rows: int) -> int:
        """Every rank's ``local_rows`` added up (one process: ``local_rows``)."""
        return int(self.sum(torch.tensor([float(local_rows)], dtype=torch.float64)))

    def max_int(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        if not self.distributed:
            return int(value)
        import torch.distributed as dist

        with self._collective("all-reduce"):
            work = torch.tensor([int(value)], dtype=torch.long, device=self.device)
            dist.all_reduce(work, op=dist.ReduceOp.MAX)
        return int(work.item())

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Rows ``(n, ...)``: each rank's block ``local (n_r, ...)`` of :meth:`shard` ``(n)``, concatenated in rank
        order, on every rank (on ``local``'s device)."""
        if not self.distributed:
            return local
        import torch.distributed as dist

        b = self.bounds(n)
        sizes = [b[r + 1] - b[r] for r in range(self.world_size)]
        if local.shape[0] != sizes[self.rank]:
            raise ValueError(f"{self.describe()} holds {sizes[self.rank]} of {n} rows, got {local.shape[0]}.")
        width = max(sizes)
        padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        with self._collective("all-gather"):
            dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(local.device)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        with self._collective("broadcast"):
            dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def on_main(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` on rank 0 only and give its result to every rank. If it raises, rank 0 re-raises it and
        every other rank raises :class:`DistributedInferenceError` with its message (no rank waits forever)."""
        if not self.distributed:
            return action()
        outcome, error = None, None
        if self.is_main:
            try:
                outcome = ("ok", action())
            except Exception as caught:  # noqa: BLE001 - told to the other ranks, then raised here
                error, outcome = caught, ("error", f"{type(caught).__name__}: {caught}")
        outcome = self.broadcast(outcome)
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise DistributedInferenceError(f"UIP inference, {self.describe()}: rank 0 stopped: {outcome[1]}")
        return outcome[1]

    def same_on_all(self, value: Any) -> bool:
        """Whether every rank passed an equal (picklable, ``==``-comparable) ``value``."""
        if not self.distributed:
            return True
        mismatch = float(self.broadcast(value) != value)
        return float(self.sum(torch.tensor([mismatch]))) == 0


def sample_index(weights: torch.Tensor, generator: torch.Generator, comm: Communicator) -> tuple[int, int]:
    """Draw one row of all ranks' rows (in user order) with probability proportional to ``weights (n_r,)``
    (this rank's block, non-negative), by inverse CDF: one uniform draw from ``generator`` (the same on every rank),
    so every rank picks the same row. Returns ``(owner rank, row within its block)``; ``(-1, -1)`` where every
    weight is zero."""
    local = weights.double()
    totals = torch.zeros(comm.world_size, dtype=torch.float64)
    totals[comm.rank] = local.sum()
    totals = comm.sum(totals)
    target = float(torch.rand((), generator=generator, dtype=torch.float64)) * float(totals.sum())
    if float(totals.sum()) <= 0:
        return -1, -1
    before = torch.cumsum(totals, 0) - totals                                  # (W,) weight of the earlier ranks
    owner = int(torch.searchsorted(torch.cumsum(totals, 0), torch.tensor([target], dtype=torch.float64), right=True))
    owner = min(owner, comm.world_size - 1)
    while float(totals[owner]) <= 0:                                           # a rank with no weight: the next one
        owner -= 1
    if owner != comm.rank:
        return owner, -1
    cumulative = torch.cumsum(local, 0)
    row = int(torch.searchsorted(cumulative, torch.tensor([target - float(before[owner])], dtype=torch.float64), right=True))
    row = min(row, len(local) - 1)
    while float(local[row]) <= 0 and row > 0:                                  # rounding at the block's end
        row -= 1
    return owner, row


def uniform_index(n: int, generator: torch.Generator) -> int:
    """A row of ``n`` (all ranks' rows) drawn uniformly with one draw from ``generator``."""
    return min(int(float(torch.rand((), generator=generator, dtype=torch.float64)) * n), n - 1)


def row_from_owner(x: torch.Tensor, owner: int, row: int, comm: Communicator) -> torch.Tensor:
    """``(D,)``: row ``row`` of the block ``x (n_r, D)`` held by rank ``owner``, on every rank."""
    value = x[row].clone() if comm.rank == owner else torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    return comm.sum(value)


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def launched_ranks() -> int:
    """The world size that ``torchrun`` (or another launcher setting ``WORLD_SIZE``) started; 1 otherwise."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


_current: Communicator | None = None


def init_from_environment(device: torch.device, timeout_minutes: float = 30.0) -> tuple[Communicator, torch.device]:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``) and make it the current communicator. On CUDA each process takes the GPU
    ``LOCAL_RANK``. Returns the communicator and the device this rank computes on.

    Without ``WORLD_SIZE`` > 1 (a plain process) nothing is joined: the world of one."""
    global _current
    world = launched_ranks()
    if world <= 1:
        _current = Communicator()
        return _current, device
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device), rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    _current = Communicator(rank, world, device if device.type == "cuda" else torch.device("cpu"))
    _stop_cleanly_on_sigterm(_current)
    return _current, device


def _stop_cleanly_on_sigterm(comm: Communicator) -> None:
    """torchrun stops the other ranks with SIGTERM when one fails: say so in one line (the default would end the
    process without a word, leaving only torchrun's summary)."""
    import signal

    def stop(signum, frame):  # noqa: ARG001
        raise DistributedInferenceError(
            f"UIP inference, {comm.describe()}: stopped by the launcher (SIGTERM) during {comm.phase}, most likely "
            f"because another rank failed (see torchrun's summary for the root cause); nothing was published.")

    signal.signal(signal.SIGTERM, stop)


def current() -> Communicator:
    """The communicator joined by :func:`init_from_environment`, or the world of one."""
    return _current or Communicator()


def shutdown() -> None:
    """Leave the process group joined by :func:`init_from_environment` (no-op otherwise)."""
    global _current
    if _current is not None and _current.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _current = None
