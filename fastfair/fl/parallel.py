"""A round's clients trained in worker processes, with the sequential round's results.

``RoundRunner.run_round`` trains its clients one after another from the runner's one generator.
The draws a client's local round makes are known in advance (one ``randperm`` and one
``randint`` per local epoch, and with ``negative_sampling="unseen"`` the redraws of the negatives
that hit one of the client's positives: ``runner.replay_local_train``), so the generator state
every client starts from, and the one it leaves, can be computed before any client trains.
``FederatedRunner`` with ``workers > 1`` does that, hands each client's download and start
state to this pool, and then runs the round as usual, taking each client's trained parameters,
loss and optimizer state from the pool, after checking that the round reached the same state.

Each worker trains with one torch thread and one Numba thread, so ``workers`` processes use
``workers`` cores. With one thread in the parent too, the round is bit-identical to the
sequential one (``tests/test_parallel.py``). With more threads in the parent, the two agree up
to float summation order.

Threads cannot do this: the per-step Python work and the Numba kernels hold the GIL (2 clients
in threads ran at 0.94x, ``docs/results.md``). Workers are spawned, not forked, because a fork
after OpenMP or Numba's threading layer has started can deadlock. Tensors travel through
shared memory (``torch.multiprocessing``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.multiprocessing as mp

_STATE: dict = {}


@dataclasses.dataclass
class Job:
    """One client's local round: its downloaded model, the generator state it starts from and
    the one the round expects after it, and its optimizer state when persistent."""

    client: int
    model: torch.nn.Module
    start: torch.Tensor
    end: torch.Tensor
    optimizer_state: Optional[list]


@dataclasses.dataclass
class Trained:
    """What a worker returns: the trained parameters, the loss, the generator states and the
    optimizer state (persistent only)."""

    client: int
    params: dict
    loss: float
    start: torch.Tensor
    end: torch.Tensor
    optimizer_state: Optional[list]


def _init_worker(data, cfg) -> None:
    torch.set_num_threads(1)
    try:
        import numba
        numba.set_num_threads(1)
    except ImportError:  # fastfair then runs its reference kernels
        pass
    _STATE["data"], _STATE["cfg"] = data, cfg


def _train(job: Job) -> Trained:
    from .runner import train_client

    data, cfg = _STATE["data"], _STATE["cfg"]
    gen = torch.Generator()
    gen.set_state(job.start)
    loss, state = train_client(cfg, data.user_items(job.client), data.num_items, job.model, gen,
                               job.optimizer_state)
    if not torch.equal(gen.get_state(), job.end):
        raise RuntimeError(f"client {job.client}'s local round drew other numbers than "
                           "replay_local_train replays")
    params = {k: v.detach() for k, v in job.model.named_parameters()}
    return Trained(job.client, params, loss, job.start, job.end, state)


class ClientPool:
    """``workers`` spawned processes holding the data and config, training ``Job``s."""

    def __init__(self, data, cfg, workers: int):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 2:
            raise ValueError(f"a client pool needs workers >= 2, got {workers!r}")
        self.workers = workers
        self._pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                  initargs=(data, cfg))

    def train(self, jobs: list) -> list:
        """The ``Trained`` result of every job, in order."""
        return self._pool.map(_train, jobs, chunksize=1)

    def close(self) -> None:
        self._pool.close()
        self._pool.join()
