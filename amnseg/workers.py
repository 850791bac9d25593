"""Worker processes for the CPU work that runs per image beside the main process (the dense
CRFs of the seed stage and of the segmentation net's evaluation)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
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
