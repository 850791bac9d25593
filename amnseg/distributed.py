"""Running under ``torchrun``: the process group, this process's rank and device, and the few
collective steps the stages need (barrier, broadcast from rank 0, sums across ranks).

Launched by torchrun (``WORLD_SIZE`` > 1 in the environment), ``setup`` joins the process group
(NCCL on CUDA, gloo on the CPU); every rank then runs the same code. Without torchrun every
helper here is a no-op for a world of one process, so the stages need no second code path.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from amnseg.errors import AmnsegError

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Whether torchrun (or a launcher setting the same variables) started this process; a
    world of one process counts too, so that ``--nproc_per_node=1`` runs the DDP code path."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def setup(device_spec: str = "auto") -> None:
    """Join torchrun's process group (once); a no-op outside torchrun."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    _check_launcher_variables()
    wants_cuda = device_spec.startswith("cuda") or (
        device_spec == "auto" and torch.cuda.is_available())
    if wants_cuda:
        torch.cuda.set_device(local_rank())
    if "TORCHELASTIC_RUN_ID" not in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        # A launcher script (srun, mpirun) or a shell's leftovers: the group waits for every
        # process, and a process alone would wait silently for half an hour.
        print(f"amnseg: waiting for the {os.environ['WORLD_SIZE']} processes of "
              f"WORLD_SIZE={os.environ['WORLD_SIZE']} (this one RANK={os.environ['RANK']}) at "
              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}; not started by "
              "torchrun: unset RANK, WORLD_SIZE and MASTER_ADDR to run alone", file=sys.stderr,
              flush=True)
    dist.init_process_group("nccl" if wants_cuda else "gloo")
    # Leave the group before the interpreter shuts down: a process whose group is still alive
    # at exit can abort there ("terminate called without an active exception", seen once in
    # the 2-rank test on CI-like load), after all its work is written.
    atexit.register(_leave)


def _check_launcher_variables() -> None:
    """torchrun's variables, read as it sets them; anything else (a launcher script's typo, a
    shell's leftovers) is one line before the process group would fail or wait forever."""
    numbers = {}
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        text = os.environ.get(name)
        if text is None and name in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
            raise AmnsegError(f"{name} is not set, but RANK, WORLD_SIZE and MASTER_ADDR are: "
                              "start several processes with torchrun, or unset them")
        if text is not None:
            if not text.strip().isdigit():
                raise AmnsegError(f"{name}={text!r}: expected a whole number (torchrun sets it)")
            numbers[name] = int(text)
    if numbers["WORLD_SIZE"] < 1 or numbers["RANK"] >= numbers["WORLD_SIZE"]:
        raise AmnsegError(f"RANK={numbers['RANK']}, WORLD_SIZE={numbers['WORLD_SIZE']}: a rank "
                          "must lie in 0 .. WORLD_SIZE - 1 (torchrun sets them)")
    if numbers.get("LOCAL_WORLD_SIZE", 1) < 1:
        raise AmnsegError("LOCAL_WORLD_SIZE=0: expected at least 1 (torchrun sets it)")


# How a collective fails when another process of the job stopped (gloo, NCCL).
PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "remote process exited", "communicator was aborted")
PEER_STOPPED = ("another process of this torchrun job stopped (its error is above); the same "
                "command resumes where it stopped")


def peer_stopped(error: BaseException) -> bool:
    """Whether ``error`` is a collective step's failure because another process of the job
    stopped: the error that matters is that process's own."""
    size = os.environ.get("WORLD_SIZE", "1").strip()
    if not (size.isdigit() and int(size) > 1 and isinstance(error, RuntimeError)):
        return False
    return (isinstance(error, getattr(dist, "DistError", ())) or
            any(sign in str(error) for sign in PEER_SIGNS))


def record_error(message: str) -> None:
    """Leave a user error's one line where torchrun looks for a failed process's reason (the
    file named by ``TORCHELASTIC_ERROR_FILE``, which it sets for every process it starts): its
    failure summary then shows this line, not a link to its documentation. Best effort: a file
    that cannot be written leaves the summary as torchrun makes it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        # torchrun reads a plain message with its time; it only reads once the process ended.
        with open(path, "w", encoding="utf-8") as file:
            json.dump({"message": message, "timestamp": int(time.time())}, file)
    except OSError:
        pass


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is in torchrun's process group (of one process or more)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def cores_per_process() -> int:
    """CPU cores for this process's worker pools: the machine's, split between the processes
    torchrun started on it."""
    text = os.environ.get("LOCAL_WORLD_SIZE", "1").strip()
    processes = int(text) if text.isdigit() and int(text) > 0 else 1  # not torchrun's: one
    return max(1, (os.cpu_count() or 1) // processes)


def is_main() -> bool:
    """Whether this process writes shared files, logs and progress bars (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not active():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sum_across(values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over all ranks."""
    if not active():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def global_count(count: torch.Tensor) -> torch.Tensor:
    """``count`` summed over every rank's batch (no gradient flows through it)."""
    if not active():
        return count
    count = count.detach().clone().to(torch.float64)
    dist.all_reduce(count)
    return count


def loss_scale() -> int:
    """What a rank multiplies its share of a global-batch loss by: DistributedDataParallel
    averages the ranks' gradients, so sum_rank(own total) / global count needs world_size."""
    return world_size()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of rank 0's ``items`` (every world_size-th, from its rank on).

    Rank 0's list is the one shared out: lists of work still to do, made by each rank from the
    files present, would differ as soon as one rank starts writing.
    """
    return list(broadcast(list(items))[rank()::world_size()])


def per_rank_batch(global_batch: int, what: str) -> int:
    """The batch each rank takes so that the global batch is the configured one."""
    if global_batch % world_size():
        raise AmnsegError(
            f"{what}={global_batch}: not divisible by the {world_size()} processes; the global "
            "batch must split evenly"
        )
    return global_batch // world_size()


def run_on_main(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(*args)`` on rank 0 only; every rank gets its result (after a barrier)."""
    result = function(*args, **kwargs) if is_main() else None
    return broadcast(result)
