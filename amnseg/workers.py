"""Worker processes for the CPU work that runs per image beside the main process (the dense
CRFs of the seed stage and of the segmentation net's evaluation, the map stages' threshold
sweeps)."""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any


@contextmanager
def worker_pool(workers: int, initializer: Callable[..., Any] | None = None,
                initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """``workers`` forked processes (each inherits the parent's memory: the job, the patched
    functions of a test). Leaving the block waits for the submitted work; on an error the work
    not started is dropped and the tasks running finish (one image each) before the error goes
    on. Workers are never killed: ``multiprocessing.Pool.terminate`` kills them even while one
    holds its result queue's lock, and the pool's own threads can then wait for that lock
    forever (a hang seen on a loaded machine)."""
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=initializer, initargs=initargs)
    try:
        yield executor
    except BaseException:
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


def in_order(run: Callable[[Any], Any], jobs: Iterable[Any], workers: int,
             initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> Iterator[Any]:
    """``run(job)`` of every job, in the jobs' order: in this process when ``workers`` <= 1
    (``initializer`` is not called then), else in ``workers`` worker processes with at most two
    jobs per worker waiting, so that large results do not pile up. Sums over the results are
    then the same, float order included, whatever the number of workers."""
    if workers <= 1:
        yield from map(run, jobs)
        return
    with worker_pool(workers, initializer, initargs) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(run, job))
            while len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# This worker process's job, set once as its pool starts it (``set_job`` as the initializer):
# sending it with every task would pickle it (a dataset's stems, labels and paths: ~1.7 MB at
# VOC's 10,582 images) for every image, in the one main process that feeds all the workers.
_job: Any = None


def set_job(job: Any) -> None:
    global _job
    _job = job


def call_with_job(run: Callable[[Any, Any], Any], item: Any) -> Any:
    """``run(job, item)`` with the job ``set_job`` gave this worker process."""
    assert _job is not None, "the pool's initializer sets the job"
    return run(_job, item)


def in_order_with_job(run: Callable[[Any, Any], Any], job: Any, items: Iterable[Any],
                      workers: int) -> Iterator[Any]:
    """``run(job, item)`` of every item, in order, as ``in_order`` runs its jobs: in worker
    processes the job is sent once per process, not with every item."""
    if workers <= 1:
        yield from (run(job, item) for item in items)
        return
    yield from in_order(partial(call_with_job, run), items, workers, set_job, (job,))
