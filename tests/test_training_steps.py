"""Each training stage's optimiser against the reference recipe: which parameters it receives
(by name), their learning rates, weight decay and momentum, and two steps' updates computed by
hand from the optimisers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amnseg.config import AmnConfig, CamConfig, IrnConfig
from amnseg.losses import amn_loss
from amnseg.models import CAMNet, ResNet
from amnseg.models.amn import AMN
from amnseg.models.irn import BoundaryNet
from amnseg.stages.amn import amn_optimizer
from amnseg.stages.cam import cam_loss, cam_optimizer
from amnseg.stages.irn import irn_optimizer
from amnseg.training import train_step

STEM = {"conv1.weight", "bn1.weight", "bn1.bias"}


def tiny_backbone() -> ResNet:
    torch.manual_seed(0)
    backbone = ResNet(depth=18, width=0.25, strides=[2, 2, 2, 1])
    for module in backbone.modules():  # non-trivial BatchNorm, so gamma/beta gradients differ
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return backbone


def group_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in optimizer.param_groups]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_cam_optimizer_groups_and_two_sgd_steps():
    model = CAMNet(tiny_backbone(), 3)
    config = CamConfig()
    total = 10
    optimizer, scheduler = cam_optimizer(model, config, total)
    backbone, head = group_names(model, optimizer)
    everything = {n for n, _ in model.named_parameters()}
    # Every backbone parameter but the stem, BatchNorm gamma/beta included.
    assert backbone == {n for n in everything if n.startswith("backbone.")} - {
        f"backbone.{n}" for n in STEM}
    assert "backbone.layer3.0.bn1.weight" in backbone and "backbone.layer4.1.bn2.bias" in backbone
    assert head == {"classifier.weight"}
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 1.0]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 1e-4]
    assert [g["momentum"] for g in optimizer.param_groups] == [1e-4, 1e-4]

    images = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    start = snapshot(model)
    loss = train_step(model, [[images, labels]], cam_loss, optimizer, scheduler)
    first_grads = grads(model)
    after_first = snapshot(model)
    train_step(model, [[images, labels]], cam_loss, optimizer, scheduler)
    second_grads = grads(model)
    after_second = snapshot(model)
    assert math.isfinite(loss)

    momentum, decay = 1e-4, 1e-4
    for name, p0 in start.items():
        if name.startswith("backbone.") and name[len("backbone."):] in STEM:
            assert torch.equal(after_second[name], p0), f"{name}: the stem must not train"
            continue
        base = 1.0 if name == "classifier.weight" else 0.1
        g0 = first_grads[name]
        if g0 is None:  # layer1-2: behind the detach, no gradient, untouched
            assert name.startswith(("backbone.layer1", "backbone.layer2")), name
            assert torch.equal(after_second[name], p0)
            continue
        # torch SGD with momentum: buf = d_p on the first step, buf = m * buf + d_p after.
        d0 = g0 + decay * p0
        p1 = p0 - base * d0  # lr factor (1 - 0/10) ** 0.9 = 1
        torch.testing.assert_close(after_first[name], p1, rtol=1e-6, atol=1e-8)
        d1 = second_grads[name] + decay * after_first[name]
        lr1 = base * (1 - 1 / total) ** 0.9
        p2 = after_first[name] - lr1 * (momentum * d0 + d1)
        torch.testing.assert_close(after_second[name], p2, rtol=1e-6, atol=1e-8)
    assert not torch.equal(after_second["backbone.layer3.0.bn1.weight"],
                           start["backbone.layer3.0.bn1.weight"])


def test_cam_loss_is_multilabel_soft_margin_by_hand():
    model = CAMNet(tiny_backbone(), 3).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    logits = model(images).double()
    by_hand = -(labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits)).mean(1)
    assert cam_loss(model, images, labels).item() == pytest.approx(by_hand.mean().item(),
                                                                    rel=1e-5)


def test_amn_optimizer_groups_and_two_adam_steps():
    model = AMN(tiny_backbone(), 3, dropout=0.1)
    config = AmnConfig()
    optimizer, scheduler = amn_optimizer(model, config)
    backbone, new = group_names(model, optimizer)
    assert backbone == {n for n, _ in model.named_parameters() if n.startswith("backbone.")} - {
        f"backbone.{n}" for n in STEM}
    assert {"backbone.layer1.0.bn1.weight", "backbone.layer1.0.bn1.bias"} <= backbone
    assert new == {"label_enc.weight", "label_enc.bias"} | {
        f"classifier.1.c{i}.{kind}" for i in range(4) for kind in ("weight", "bias")}
    assert [g["lr"] for g in optimizer.param_groups] == [5e-6, 1e-4]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 1e-4]

    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.randint(0, 4, (2, 4, 4), generator=generator)
    targets[0, 0, :2] = 255

    def compute_loss(net, images, labels, targets):
        return amn_loss(net(images, labels), targets, 0.4)

    start = snapshot(model)
    train_step(model, [[images, labels, targets]], compute_loss, optimizer, scheduler)
    g0, p1_actual = grads(model), snapshot(model)
    train_step(model, [[images, labels, targets]], compute_loss, optimizer, scheduler)
    g1, p2_actual = grads(model), snapshot(model)

    beta1, beta2, eps, decay = 0.9, 0.999, 1e-8, 1e-4
    for name, p0 in start.items():
        if name[len("backbone."):] in STEM:
            assert torch.equal(p2_actual[name], p0), name
            continue
        lr = 5e-6 if name.startswith("backbone.") else 1e-4  # constant: no schedule
        d0 = g0[name] + decay * p0
        m1, v1 = (1 - beta1) * d0, (1 - beta2) * d0 * d0
        p1 = p0 - lr * (m1 / (1 - beta1)) / ((v1 / (1 - beta2)).sqrt() + eps)
        torch.testing.assert_close(p1_actual[name], p1, rtol=1e-5, atol=1e-9)
        d1 = g1[name] + decay * p1_actual[name]
        m2, v2 = beta1 * m1 + (1 - beta1) * d1, beta2 * v1 + (1 - beta2) * d1 * d1
        p2 = p1_actual[name] - lr * (m2 / (1 - beta1**2)) / (
            (v2 / (1 - beta2**2)).sqrt() + eps)
        torch.testing.assert_close(p2_actual[name], p2, rtol=1e-5, atol=1e-9)


def test_irn_optimizer_trains_only_the_boundary_layers():
    model = BoundaryNet(tiny_backbone())
    config = IrnConfig()
    total = 4
    optimizer, scheduler = irn_optimizer(model, config, total)
    (names,) = group_names(model, optimizer)
    assert names == {n for n, _ in model.named_parameters() if n.startswith("fc_edge")}
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.1, 1e-4, 1e-4)

    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    def compute_loss(net, images):
        return torch.sigmoid(net(images)).mean()

    start = snapshot(model)
    train_step(model, [[images]], compute_loss, optimizer, scheduler)
    g0, p1_actual = grads(model), snapshot(model)
    train_step(model, [[images]], compute_loss, optimizer, scheduler)
    g1, p2_actual = grads(model), snapshot(model)
    for name, p0 in start.items():
        if not name.startswith("fc_edge"):
            assert torch.equal(p2_actual[name], p0), name  # frozen backbone
            continue
        d0 = g0[name] + 1e-4 * p0
        torch.testing.assert_close(p1_actual[name], p0 - 0.1 * d0, rtol=1e-6, atol=1e-9)
        d1 = g1[name] + 1e-4 * p1_actual[name]
        lr1 = 0.1 * (1 - 1 / total) ** 0.9
        expected = p1_actual[name] - lr1 * (1e-4 * d0 + d1)
        torch.testing.assert_close(p2_actual[name], expected, rtol=1e-6, atol=1e-9)


def test_poly_schedule_reaches_zero_and_stays():
    model = CAMNet(tiny_backbone(), 2)
    optimizer, scheduler = cam_optimizer(model, CamConfig(lr=0.2), 5)
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.2 * (1 - min(k, 5) / 5) ** 0.9 for k in range(7)]
    np.testing.assert_allclose(rates, expected, rtol=1e-12)


def test_steady_rate_counts_only_what_follows_the_first_step():
    from amnseg.training import steady_rate

    # First step done at t = 12 s with 16 images; 4 more steps of 16 by t = 14 s.
    assert steady_rate((12.0, 16), 80, 14.0) == pytest.approx(32.0)
    assert steady_rate((12.0, 16), 16, 12.5) is None  # nothing after the first step
    assert steady_rate(None, 0, 1.0) is None
    assert steady_rate((12.0, 16), 80, 12.0) is None  # no time after it (not a division by 0)



class CountedLoss:
    """A loss scalar that counts how often it is read."""

    def __init__(self, value: float):
        self.value, self.reads = value, 0

    def item(self) -> float:
        self.reads += 1
        return self.value


def test_loss_total_reads_each_loss_once_and_one_step_late():
    from amnseg.training import LossTotal

    losses = LossTotal()
    first, second, third = CountedLoss(0.5), CountedLoss(0.25), CountedLoss(2.0)
    losses.add(first, 4)
    assert first.reads == 0 and losses.total == 0.0 and losses.last is None
    losses.add(second, 2)  # queuing step 2 reads step 1
    assert (first.reads, second.reads) == (1, 0) and losses.total == 2.0 and losses.last == 0.5
    losses.read()
    losses.read()  # nothing left to read
    assert second.reads == 1 and losses.total == 2.5 and losses.last == 0.25
    losses.add(third, 3)
    losses.read()
    assert [first.reads, second.reads, third.reads] == [1, 1, 1] and losses.total == 8.5


def test_train_step_returns_the_accumulated_loss_unread_in_float64():
    model = CAMNet(tiny_backbone(), 3)
    optimizer, scheduler = cam_optimizer(model, CamConfig(), total_steps=4)
    generator = torch.Generator().manual_seed(3)
    batches = [[torch.randn(2, 3, 32, 32, generator=generator),
                torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])] for _ in range(2)]
    with torch.no_grad():
        by_hand = [cam_loss(model, *batch).item() / 2 for batch in batches]
    loss = train_step(model, batches, cam_loss, optimizer, scheduler)
    assert isinstance(loss, torch.Tensor) and loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == by_hand[0] + by_hand[1]


class SlowItems(torch.utils.data.Dataset):
    """Six (input, target) pairs of a linear regression, each taking ``delay`` s to load."""

    def __init__(self, delay: float):
        self.delay = delay
        generator = torch.Generator().manual_seed(5)
        self.inputs = torch.randn(6, 3, generator=generator)
        self.targets = torch.randn(6, 1, generator=generator)

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int):
        import time

        time.sleep(self.delay)
        return self.inputs[index], self.targets[index]


def test_run_epoch_counts_steps_losses_and_the_wait_for_data():
    from amnseg.training import Schedule, run_epoch

    items = SlowItems(delay=0.02)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay as they are
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = torch.utils.data.DataLoader(items, batch_size=2)

    def mse(net, inputs, targets):
        return F.mse_loss(net(inputs), targets)

    import time

    before = time.perf_counter()
    done = run_epoch(model, loader, mse, optimizer, scheduler, torch.device("cpu"),
                     Schedule(1, 2), "test")
    assert done.seconds <= time.perf_counter() - before  # the epoch's own duration
    with torch.no_grad():
        by_hand = sum(mse(model, items.inputs[k:k + 2], items.targets[k:k + 2]).item() * 2
                      for k in (0, 2, 4))
    assert (done.images, done.steps) == (6, 3)
    assert done.loss_sum == pytest.approx(by_hand, rel=1e-12)
    # Batches 2 and 3 (4 items of 20 ms) were waited for; the first batch is not counted.
    assert 0.08 <= done.data_wait <= done.seconds
    assert done.steady is not None

    # Two batches per step, and at most 1 step: the epoch stops after 4 images.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # at step 0
    done = run_epoch(model, loader, mse, optimizer, scheduler, torch.device("cpu"),
                     Schedule(1, 2, accumulation=2, max_steps=1), "test")
    assert (done.images, done.steps) == (4, 1) and done.steady is None


def test_resolve_device_gives_each_torchrun_rank_its_own_gpu_and_leaves_the_cpu_alone(
        monkeypatch):
    from amnseg import distributed
    from amnseg.errors import AmnsegError
    from amnseg.training import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(distributed, "local_rank", lambda: 3)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # named by the user: kept
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: False)
    assert resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(AmnsegError, match="device=cuda: CUDA is not available"):
        resolve_device("cuda")


def test_steps_per_epoch_counts_full_batches_only():
    from amnseg.errors import AmnsegError
    from amnseg.training import steps_per_epoch

    assert steps_per_epoch(10, 4, "data (cam)") == 2  # the last 2 images make no batch
    assert isinstance(steps_per_epoch(10, 4, "data (cam)"), int)
    assert steps_per_epoch(8, 4, "data (cam)") == 2
    with pytest.raises(AmnsegError, match="data \\(cam\\): 3 training images is fewer than one"):
        steps_per_epoch(3, 4, "data (cam)")


def test_synchronised_batchnorm_shares_the_layers_parameters_and_settings():
    from amnseg.training import _synchronise_batchnorm

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.BatchNorm2d(6, eps=1e-3,
                                                                              momentum=0.3))
    plain = model[1]
    plain.running_mean.fill_(0.5)
    _synchronise_batchnorm(model)
    synced = model[1]
    assert isinstance(synced, torch.nn.SyncBatchNorm)
    assert (synced.num_features, synced.eps, synced.momentum) == (6, 1e-3, 0.3)
    assert synced.weight is plain.weight and synced.bias is plain.bias
    assert synced.running_mean is plain.running_mean and synced.running_var is plain.running_var
    assert synced.num_batches_tracked is plain.num_batches_tracked


def test_augmented_set_starts_at_epoch_zero(tiny_dataset):
    from amnseg.data.folder import FolderDataset
    from amnseg.training import AugmentedSet

    def draw(sample, rng):
        return float(rng.random())

    fresh = AugmentedSet(FolderDataset(tiny_dataset, "train"), draw, seed=3)
    before = [fresh[i] for i in range(len(fresh))]
    fresh.set_epoch(0)
    assert [fresh[i] for i in range(len(fresh))] == before
    fresh.set_epoch(1)
    assert [fresh[i] for i in range(len(fresh))] != before


def test_epoch_sampler_alone_is_rank_zero_of_one():
    from amnseg.training import EpochSampler

    alone = EpochSampler(23, 4, seed=5, epoch=2)
    assert list(alone) == list(EpochSampler(23, 4, seed=5, epoch=2, rank=0, world_size=1))
    assert len(alone) == 20 and len(set(alone)) == 20  # the last incomplete batch is dropped
    halves = [list(EpochSampler(23, 4, 5, 2, rank, 2)) for rank in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(alone)


def test_fit_seeds_each_epoch_from_the_run_seed_and_the_epoch(tiny_dataset, tmp_path):
    """Dropout and other global randomness of epoch e draw from epoch_seed(seed, e) (+ rank):
    what a resumed run needs to draw what an uninterrupted one drew."""
    from amnseg.config import load_config
    from amnseg.data.folder import FolderDataset
    from amnseg.training import AugmentedSet, Schedule, epoch_seed, fit

    config = load_config("demo", [f"run_dir={tmp_path / 'run'}", "data.num_workers=0",
                                  "seed=7", "device=cpu"])
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    seeds = []

    def loss(net, inputs):
        seeds.append(torch.initial_seed())
        return net(inputs).sum()

    train_set = AugmentedSet(FolderDataset(tiny_dataset, "train"),
                             lambda sample, rng: (torch.ones(1),), seed=7)
    fit("toy", config, model, optimizer, scheduler, train_set, loss, torch.device("cpu"),
        Schedule(epochs=3, batch_size=4))
    per_epoch = len(seeds) // 3
    assert seeds == [epoch_seed(7, epoch) for epoch in range(3) for _ in range(per_epoch)]
    assert len(set(seeds)) == 3 and epoch_seed(7, 1) != epoch_seed(1, 7)
    # The log: one line per epoch, its rate the epoch's images over its seconds.
    import json

    records = [json.loads(line) for line in
               (tmp_path / "run" / "toy" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for record in records:
        images = record["steps"] * 4
        assert record["images_per_s"] == pytest.approx(images / record["seconds"])
