"""Mixed precision and memory format: the ``amp`` and ``channels_last`` options.

Both are off by default, where results are the reference's. ``amp: bf16`` runs each network's
forward pass under bfloat16 autocast (matrix products and convolutions in bf16, reductions and
losses in float32; backward passes follow the forward's types); CUDA devices only, on the CPU
it has no effect. ``channels_last: true`` stores weights and image batches in NHWC order, which
the GPU's convolution kernels and the CPU's oneDNN kernels prefer (the same values up to
floating-point order; the demo's networks train 1.1-1.6x faster on 2 CPU cores,
benchmarks/RESULTS.md).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(item) for item in value)
    return value


class MixedPrecision(nn.Module):
    """``model`` with 4-D image inputs in channels_last order and its forward pass under bf16
    autocast (as enabled); floating outputs come back as float32, so what follows the network
    (losses, resizes, CRFs, files) is unchanged. Shares ``model``'s parameters. The model's
    other methods (``CAMNet.cam``) run the same way; its other attributes are its own."""

    def __init__(self, model: nn.Module, device_type: str, bf16: bool, channels_last: bool):
        super().__init__()
        self.model = model
        self.device_type, self.bf16, self.channels_last = device_type, bf16, channels_last
        # DistributedDataParallel reads this from the module it wraps.
        self.has_unused_parameters = getattr(model, "has_unused_parameters", False)

    def forward(self, *inputs: Any) -> Any:
        return self._run(self.model, *inputs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of the wrapper
        except AttributeError:
            attribute = getattr(super().__getattr__("model"), name)
        if callable(attribute) and not isinstance(attribute, nn.Module):
            return partial(self._run, attribute)
        return attribute

    def _run(self, function: Any, *inputs: Any) -> Any:
        if self.channels_last:
            inputs = tuple(
                x.contiguous(memory_format=torch.channels_last)
                if isinstance(x, torch.Tensor) and x.dim() == 4 else x
                for x in inputs
            )
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return _to_float32(function(*inputs))


def with_precision(model: nn.Module, config: Any, device: torch.device) -> nn.Module:
    """``model`` as the config's ``amp`` / ``channels_last`` options run it on ``device``: as
    is where both are off (bf16 counts on CUDA only), else wrapped in :class:`MixedPrecision`
    (and its weights moved to channels_last order)."""
    bf16 = config.amp == "bf16" and device.type == "cuda"
    if not (bf16 or config.channels_last):
        return model
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return MixedPrecision(model, device.type, bf16, config.channels_last)
