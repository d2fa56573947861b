"""A round's clients trained concurrently, with the sequential round's results.

``RoundRunner.run_round`` trains its clients one after another from the runner's one generator.
The draws a client's local round makes are known in advance (one ``randperm`` and one
``randint`` per local epoch, and with ``negative_sampling="unseen"`` the redraws of the negatives
that hit one of the client's positives: ``runner.replay_local_train``), so the generator state
every client starts from, and the one it leaves, can be computed before any client trains.
``FederatedRunner`` with ``workers > 1`` does that, hands each client's download and start
state to a pool, and then runs the round as usual, taking each client's trained parameters,
loss and optimizer state from the pool, after checking that the round reached the same state.

Two pools, one interface (``train(jobs)``):

- ``ThreadClientPool``: threads of this process. The fused local kernel
  (``fastfair.fl.fused``) runs an epoch in one Numba call compiled ``nogil``, so clients in
  threads train at once on separate cores, and their tables never leave this process.
- ``ClientPool``: spawned worker processes. The autograd loop holds the GIL for its per-step
  Python work (2 such clients in threads ran at 0.94x, ``docs/results.md``), so it needs
  processes; each client's tables travel to and from a worker through shared memory
  (``torch.multiprocessing``), which costs more than it saves for a fused client of a
  Goodreads-size table. Workers are spawned, not forked, because a fork after OpenMP or Numba's
  threading layer has started can deadlock.

``pool_kind`` picks between them (``POOLS``). A worker process trains with one torch thread and
one Numba thread; a thread of the pool runs with the process's settings, and the fused kernel is
serial whatever they are. So ``workers`` clients use about ``workers`` cores. With one thread
in the runner's process, the round is bit-identical to the sequential one
(``tests/test_parallel.py``); with more threads there, the two agree up to float summation
order.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch
import torch.multiprocessing as mp

_STATE: dict = {}

# "auto": threads when the full-capacity clients train in the fused kernel, else processes.
POOLS = ("auto", "threads", "processes")


@dataclasses.dataclass
class Job:
    """One client's local round: its downloaded model (or, for a thread, ``download``, which
    builds it there), the generator state it starts from and the one the round expects after
    it, and its optimizer state when persistent."""

    client: int
    model: Optional[torch.nn.Module]
    start: torch.Tensor
    end: torch.Tensor
    optimizer_state: Optional[list]
    download: Optional[Callable[[], torch.nn.Module]] = None


@dataclasses.dataclass
class Trained:
    """What a worker returns: the trained parameters, the loss, the generator states and the
    optimizer state (persistent only); from a thread also the trained model itself."""

    client: int
    params: dict
    loss: float
    start: torch.Tensor
    end: torch.Tensor
    optimizer_state: Optional[list]
    model: Optional[torch.nn.Module] = None


def _init_worker(data, cfg) -> None:
    torch.set_num_threads(1)
    try:
        import numba
        numba.set_num_threads(1)
    except ImportError:  # fastfair then runs its reference kernels
        pass
    _STATE["data"], _STATE["cfg"] = data, cfg


def _train_job(data, cfg, job: Job, keep_model: bool = False) -> Trained:
    from .runner import train_client

    model = job.model if job.model is not None else job.download()
    gen = torch.Generator()
    gen.set_state(job.start)
    loss, state = train_client(cfg, data.user_items(job.client), data.num_items, model, gen,
                               job.optimizer_state)
    if not torch.equal(gen.get_state(), job.end):
        raise RuntimeError(f"client {job.client}'s local round drew other numbers than "
                           "replay_local_train replays")
    params = {k: v.detach() for k, v in model.named_parameters()}
    return Trained(job.client, params, loss, job.start, job.end, state,
                   model if keep_model else None)


def _train(job: Job) -> Trained:
    return _train_job(_STATE["data"], _STATE["cfg"], job)


def _check_workers(workers) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 2:
        raise ValueError(f"a client pool needs workers >= 2, got {workers!r}")


class ClientPool:
    """``workers`` spawned processes holding the data and config, training ``Job``s."""

    def __init__(self, data, cfg, workers: int):
        _check_workers(workers)
        self.workers = workers
        self._pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                  initargs=(data, cfg))

    def train(self, jobs: list) -> list:
        """The ``Trained`` result of every job, in order."""
        return self._pool.map(_train, jobs, chunksize=1)

    def close(self) -> None:
        self._pool.close()
        self._pool.join()


class ThreadClientPool:
    """``workers`` threads of this process training ``Job``s (concurrently where the kernel
    releases the GIL: the fused one)."""

    def __init__(self, data, cfg, workers: int):
        _check_workers(workers)
        self.workers = workers
        self.data, self.cfg = data, cfg
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fastfair-client")

    def train(self, jobs: list) -> list:
        """The ``Trained`` result of every job, in order."""
        return list(self._pool.map(lambda job: _train_job(self.data, self.cfg, job, True),
                                   jobs))

    def close(self) -> None:
        self._pool.shutdown()
