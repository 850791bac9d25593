"""What every training stage shares: device choice, seeding, the poly schedule, per-sample
augmentation randomness, the training step, epoch checkpoints with resume, and JSON-lines logs."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from amnseg import distributed
from amnseg.checkpoints import weights_mismatch
from amnseg.config import config_to_dict, is_device
from amnseg.data import run_dataset
from amnseg.data.base import SegDataset
from amnseg.errors import AmnsegError
from amnseg.io import append_jsonl, atomic_path, load_checkpoint, save_checkpoint, save_json
from amnseg.layout import log_path, stage_dir, training_state_path
from amnseg.precision import with_precision
from amnseg.progress import progress_bar, say


def resolve_device(spec: str, option: str = "device") -> torch.device:
    """``auto`` -> a CUDA device when there is one, else the CPU. Under torchrun, ``auto`` and
    ``cuda`` mean this process's GPU (``LOCAL_RANK``). Errors name ``option``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if not is_device(spec):
        raise AmnsegError(f"{option}={spec}: expected auto, cpu, cuda or cuda:N")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AmnsegError(f"{option}={spec}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None and distributed.launched_by_torchrun():
        device = torch.device("cuda", distributed.local_rank())
    return device


def crf_on_gpu(spec: str) -> bool:
    """Whether a ``crf_device`` option puts the CRFs on a GPU on this machine."""
    if spec == "auto":
        return torch.cuda.is_available()
    return torch.device(spec).type == "cuda"


def crf_device_of(spec: str, option: str = "crf_device") -> torch.device | None:
    """The device of a ``crf_device`` option: None for the CPU (pydensecrf, the reference's
    C++; also ``auto`` without a GPU), else the GPU where the PyTorch mean field runs
    (``amnseg.ops.crf``)."""
    device = resolve_device(spec, option)
    return None if device.type == "cpu" else device


def steady_rate(first_step: tuple[float, int] | None, seen: int, ended: float) -> float | None:
    """Images per second after the first step, which ended at ``first_step`` = (time, images
    seen by then), up to ``ended`` with ``seen`` images: an epoch's rate without the loader's
    start-up and the first step's one-off costs (cuDNN's choices, allocations), the rate a
    long epoch runs at. None without a step after the first."""
    if first_step is None or seen <= first_step[1] or ended <= first_step[0]:
        return None
    return (seen - first_step[1]) / (ended - first_step[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the global RNGs (dropout, ...) during ``epoch``: a resumed run that restarts
    an epoch draws exactly what an uninterrupted one drew."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def poly_lr_lambda(max_step: int, power: float) -> Callable[[int], float]:
    """lr factor at ``step``: (1 - step / max_step) ** power (the reference's poly decay)."""
    return lambda step: (1.0 - min(step, max_step) / max_step) ** power


def poly_sgd(groups: list[dict[str, Any]], momentum: float, total_steps: int, power: float
             ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """The reference's PolyOptimizer: SGD over parameter ``groups`` (each with its ``lr`` and
    ``weight_decay``) and a scheduler scaling every group's lr by the poly factor of
    :func:`poly_lr_lambda` over ``total_steps``."""
    optimizer = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(total_steps, power))
    return optimizer, scheduler


class AugmentedSet(torch.utils.data.Dataset):
    """Applies ``make_item(sample, rng)`` to dataset samples (without their ground-truth masks)
    with a per-sample random generator.

    The generator is seeded from (seed, epoch, index), so augmentations do not depend on the
    number of loader workers and a resumed run sees the same crops as an uninterrupted one.
    """

    def __init__(self, dataset: SegDataset, make_item: Callable[..., Any], seed: int):
        self.dataset = dataset
        self.make_item = make_item
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.make_item(self.dataset.sample(index, with_mask=False), rng)


class EpochSampler(torch.utils.data.Sampler):
    """This rank's sample indices of one epoch, in global batches that do not depend on the
    number of processes.

    The epoch's order is a permutation drawn from (seed, epoch); its first full global batches
    are kept (the last incomplete one is dropped, like the reference). Rank r takes positions
    r, r + W, r + 2W, ... of it, so its k-th batch of B / W images and the other ranks' k-th
    batches make up exactly the k-th global batch of B images a single process takes.
    """

    def __init__(self, size: int, global_batch: int, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(size, generator=generator).tolist()
        order = order[: size // global_batch * global_batch]
        self.indices = order[rank::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def epoch_loader(
    dataset: AugmentedSet, epoch: int, batch_size: int, num_workers: int, seed: int,
    option: str = "batch_size",
) -> torch.utils.data.DataLoader:
    """This rank's shuffled batches of ``epoch`` (global batch ``batch_size``, the value of
    ``option``; see ``EpochSampler``)."""
    dataset.set_epoch(epoch)
    local = distributed.per_rank_batch(batch_size, option)
    sampler = EpochSampler(len(dataset), batch_size, seed, epoch, distributed.rank(),
                           distributed.world_size())
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=local,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def batch_option(stage: str) -> str:
    """The option that sets a training stage's global batch."""
    return f"{'seg' if stage == 'seg_gt' else stage}.batch_size"


def steps_per_epoch(num_images: int, batch_size: int, what: str) -> int:
    steps = num_images // batch_size
    if steps == 0:
        raise AmnsegError(
            f"{what}: {num_images} training images is fewer than one batch of {batch_size}"
        )
    return steps


class TrainingState:
    """Per-epoch checkpoint of a training stage (``last.pt`` in the stage folder).

    Holds model, optimiser and scheduler states and the number of finished epochs, so that a
    killed run resumes at the start of the epoch it was in.
    """

    def __init__(self, path: Path):
        self.path = path

    def restore(self, model, optimizer, scheduler) -> int:
        """Load the saved state if there is one; return the number of finished epochs."""
        if not self.path.is_file():
            return 0
        try:
            state = load_checkpoint(self.path)
        except AmnsegError as error:
            raise AmnsegError(f"{error}; delete it to train the stage afresh") from None
        mismatch = (weights_mismatch(model, state["model"])
                    if isinstance(state.get("model"), dict) else "no model weights")
        if mismatch:
            raise AmnsegError(f"{self.path}: this training state does not fit the stage's "
                              f"network ({mismatch}); delete it to train the stage afresh")
        absent = next((key for key in ("optimizer", "scheduler", "epochs_done")
                       if key not in state), None)
        if absent:
            raise AmnsegError(f"{self.path}: not a whole training state (no {absent}); delete "
                              "it to train the stage afresh")
        model.load_state_dict(state["model"])
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            return int(state["epochs_done"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise AmnsegError(f"{self.path}: damaged training state (its optimiser or schedule "
                              f"does not load: {type(exc).__name__}); delete it to train "
                              "the stage afresh") from None

    def save(self, model, optimizer, scheduler, epochs_done: int) -> None:
        save_checkpoint(
            self.path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epochs_done": epochs_done,
            },
        )


def log_metrics(path: Path, record: dict[str, Any]) -> None:
    append_jsonl(path, record)


def _log_epoch(line: str) -> int:
    """The epoch of a log record; a damaged line counts as after every epoch (dropped)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return sys.maxsize
    return record.get("epoch", 0) if isinstance(record, dict) else sys.maxsize


def keep_log_lines(path: Path, epochs_done: int) -> None:
    """Drop log records of epochs after ``epochs_done`` (a run killed after logging an epoch but
    before saving its state repeats it; its line must not appear twice)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = [line for line in lines if line.strip() and _log_epoch(line) <= epochs_done]
    if len(kept) != len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in kept))


def start_stage(config: Any, stage: str, split: str) -> tuple[Path, torch.device, SegDataset]:
    """Common start of a training stage: its folder (with the config as JSON), seeded RNGs,
    the device and the dataset of ``split``."""
    out_dir = stage_dir(config, stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        save_json(out_dir / "config.json", config_to_dict(config))
    seed_everything(config.seed)
    return out_dir, resolve_device(config.device), run_dataset(config, split)


def tensorboard_writer(folder: Path):
    """A TensorBoard writer when the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def train_step(
    model: torch.nn.Module,
    micro_batches: list[list[torch.Tensor]],
    compute_loss: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> torch.Tensor:
    """One optimisation step over ``micro_batches`` (gradient accumulation: each batch's loss is
    divided by their number before its backward pass); returns the step's loss, a float64
    scalar on the model's device, not read here: reading it would make the CPU wait for the
    GPU. The scheduler steps after the optimiser, so step k uses the learning rate of schedule
    step k (the reference's order)."""
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    for batch in micro_batches:
        loss = compute_loss(model, *batch) / len(micro_batches)
        loss.backward()
        total = total.to(loss.device) + loss.detach().double()
    optimizer.step()
    scheduler.step()
    return total


@dataclass(frozen=True)
class Schedule:
    """How long a stage trains: ``epochs`` passes over the data in shuffled batches of
    ``batch_size`` (the last incomplete batch dropped, like the reference), ``accumulation``
    batches per optimiser step, and at most ``max_steps`` steps in all when given."""

    epochs: int
    batch_size: int
    accumulation: int = 1
    max_steps: int | None = None


def for_training(model: torch.nn.Module, device: torch.device, sync_batchnorm: bool = False
                 ) -> torch.nn.Module:
    """``model`` as the training step calls it: as is in one process, wrapped in
    DistributedDataParallel under torchrun (its ordinary BatchNorm layers synchronised across
    ranks with ``sync_batchnorm``; fixed-statistics BatchNorm needs nothing)."""
    if not distributed.active():
        return model
    if sync_batchnorm:
        _synchronise_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        # CAMNet's layer1-2 sit behind a detach: trainable but without gradients.
        find_unused_parameters=getattr(model, "has_unused_parameters", False),
    )


def _synchronise_batchnorm(model: torch.nn.Module) -> None:
    """Replace every plain BatchNorm2d (not the fixed-statistics kind) by a SyncBatchNorm that
    shares its parameters and buffers, so optimisers and checkpoints are unaffected."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.BatchNorm2d:
                synced = torch.nn.SyncBatchNorm(child.num_features, child.eps, child.momentum,
                                                child.affine, child.track_running_stats)
                synced.weight, synced.bias = child.weight, child.bias
                synced.running_mean, synced.running_var = child.running_mean, child.running_var
                synced.num_batches_tracked = child.num_batches_tracked
                setattr(parent, name, synced)


class LossTotal:
    """An epoch's sum of step loss x images. Each step's loss (a scalar on the device) is read
    one step late: by then the next step is queued, so the GPU does not sit idle while the CPU
    reads a loss and launches the next step's kernels."""

    def __init__(self) -> None:
        self.total = 0.0
        self.last: float | None = None  # the latest loss read
        self._unread: tuple[torch.Tensor, int] | None = None

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.read()
        self._unread = (loss, images)

    def read(self) -> None:
        """Read the loss not yet read (waits for its step to finish)."""
        if self._unread is not None:
            loss, images = self._unread
            self.last = loss.item()
            self.total += self.last * images
            self._unread = None


@dataclass(frozen=True)
class EpochDone:
    """What one process's epoch did: images and optimiser steps, the sum of step loss x
    images, seconds, images/s after the first step (None: no step after it), and the seconds
    the loop waited for the loader after its first batch (the first also waits for the workers
    to start): near 0 when data loading keeps up with the steps."""

    images: int
    steps: int
    loss_sum: float
    seconds: float
    steady: float | None
    data_wait: float


def run_epoch(
    net: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    compute_loss: Callable[..., torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    schedule: Schedule,
    description: str,
) -> EpochDone:
    """The optimiser steps of one epoch over ``loader`` (``schedule.accumulation`` batches per
    step, none past ``schedule.max_steps``), with a progress bar."""
    started, seen, steps, data_wait = time.perf_counter(), 0, 0, 0.0
    first_step: tuple[float, int] | None = None  # (when, images) at the first step's end
    micro_batches: list[list[torch.Tensor]] = []
    losses = LossTotal()
    batches = iter(loader)
    with progress_bar(total=len(loader) // schedule.accumulation, desc=description,
                      leave=False) as bar:
        while schedule.max_steps is None or scheduler.last_epoch < schedule.max_steps:
            asked = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            if seen or micro_batches:
                data_wait += time.perf_counter() - asked
            micro_batches.append([tensor.to(device, non_blocking=True) for tensor in batch])
            if len(micro_batches) < schedule.accumulation:
                continue
            loss = train_step(net, micro_batches, compute_loss, optimizer, scheduler)
            images = sum(len(b[0]) for b in micro_batches)
            losses.add(loss, images)
            seen, steps = seen + images, steps + 1
            if first_step is None:
                losses.read()  # waits for the step: its end is where the steady rate starts
                first_step = (time.perf_counter(), seen)
            micro_batches = []
            bar.update()
            if losses.last is not None:
                bar.set_postfix(loss=f"{losses.last:.4f}")
        losses.read()
    ended = time.perf_counter()
    return EpochDone(seen, steps, losses.total, ended - started,
                     steady_rate(first_step, seen, ended), data_wait)


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    """cuDNN's per-shape algorithm search on (or off) inside the block, as before after it: the
    stages that run next in the same process (maps, evaluation) keep their own setting."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def check_compiler(mode: str, device: torch.device) -> None:
    """torch.compile's inductor builds C++ on the CPU and Triton kernels on CUDA: say so in one
    line before training rather than in a compiler traceback at the first step."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise AmnsegError(f"compile_training={mode}: torch.compile needs Triton on CUDA "
                              "(pip install triton), or set compile_training=off")
        return
    compilers = [os.environ.get("CXX"), "g++", "clang++", "c++"]
    if not any(shutil.which(name) for name in compilers if name):
        raise AmnsegError(f"compile_training={mode}: torch.compile needs a C++ compiler on the "
                          "CPU (none found: install g++ or set CXX), or set compile_training=off")


# The fields of every epoch's log record; the console line shows the others (val_miou, ...).
_LOG_FIELDS = ("stage", "epoch", "split", "train_images", "steps", "loss", "lr", "images_per_s",
               "steady_images_per_s", "seconds", "data_wait_s", "processes")


def fit(
    stage: str,
    config: Any,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_set: AugmentedSet,
    compute_loss: Callable[..., torch.Tensor],
    device: torch.device,
    schedule: Schedule,
    after_epoch: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """The one training loop of every stage.

    Loader workers and the seed come from ``config``; outputs go to ``<run_dir>/<stage>``.
    Each batch is a tuple of tensors moved to ``device`` and passed to
    ``compute_loss(model, *batch)``. After each epoch: optional extra metrics
    (``after_epoch()``, run by rank 0), a JSON line in ``<run_dir>/<stage>/log.jsonl``, a
    console line and a checkpoint (``last.pt``); a run that finds ``last.pt`` resumes after its
    last epoch. Under torchrun every rank trains on its share of each global batch (see
    ``EpochSampler``) and rank 0 writes the files.
    """
    out_dir = stage_dir(config, stage)
    state = TrainingState(training_state_path(config, stage))
    first_epoch = state.restore(model, optimizer, scheduler)
    net = for_training(with_precision(model, config, device), device, config.sync_batchnorm)
    if config.compile_training != "off":
        check_compiler(config.compile_training, device)
        net = torch.compile(net, mode=config.compile_training)
    if distributed.is_main():
        keep_log_lines(log_path(config, stage), first_epoch)
    board = tensorboard_writer(out_dir / "tensorboard") if distributed.is_main() else None
    epochs = schedule.epochs
    with cudnn_benchmark(config.cudnn_benchmark):
        for epoch in range(first_epoch, epochs):
            # Dropout and other global randomness: seeded per epoch (and rank), so a resumed
            # run draws what an uninterrupted one drew.
            torch.manual_seed(epoch_seed(config.seed, epoch) + distributed.rank())
            model.train()
            loader = epoch_loader(train_set, epoch, schedule.batch_size,
                                  config.data.num_workers, config.seed, batch_option(stage))
            done = run_epoch(net, loader, compute_loss, optimizer, scheduler, device, schedule,
                             f"{stage} epoch {epoch + 1}/{epochs}")
            steady = done.steady
            if steady is not None:
                steady *= distributed.world_size()  # the ranks step together
            # Summed over ranks, so that every rank sees a NaN.
            loss_sum, seen = distributed.sum_across([done.loss_sum, done.images])
            if not math.isfinite(loss_sum):
                raise AmnsegError(
                    f"{stage} epoch {epoch + 1}: the training loss is "
                    f"{loss_sum / max(seen, 1)}: training diverged (lower {stage}'s learning "
                    "rate); this epoch was not saved, so a rerun starts again from it")
            record: dict[str, Any] = {
                "stage": stage,
                "epoch": epoch + 1,
                "split": getattr(train_set.dataset, "split", None),
                "train_images": len(train_set),
                "steps": done.steps,
                "loss": loss_sum / max(seen, 1),
                "lr": [group["lr"] for group in optimizer.param_groups],
                "images_per_s": seen / done.seconds if done.seconds > 0 else None,
                "steady_images_per_s": steady,
                "seconds": done.seconds,
                "data_wait_s": done.data_wait,  # rank 0's (rank 0 writes the log)
                "processes": distributed.world_size(),
            }
            if after_epoch is not None:
                record.update(distributed.run_on_main(after_epoch))
                model.train()
            if distributed.is_main():
                log_metrics(log_path(config, stage), record)
                if board is not None:
                    for key, value in record.items():
                        if isinstance(value, float):
                            board.add_scalar(f"{stage}/{key}", value, epoch + 1)
                    board.flush()
                extras = "".join(f", {key} {value:.4f}" for key, value in record.items()
                                 if key not in _LOG_FIELDS and isinstance(value, float))
                say(f"{stage} epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, "
                    f"{seen / max(done.seconds, 1e-9):.1f} img/s{extras}")
                state.save(model, optimizer, scheduler, epoch + 1)
            distributed.barrier()
