"""Independent network passes on their own CUDA streams, so that the GPU runs them side by side
(used for the MSC scales of the segmentation network, ``seg.scale_streams``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache

import torch


@cache
def side_streams(device: torch.device, count: int) -> tuple[torch.cuda.Stream, ...]:
    """``count`` CUDA streams of ``device``, made once (a stream per call would leak them)."""
    return tuple(torch.cuda.Stream(device) for _ in range(count))


def map_on_streams(
    fn: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``[fn(x) for x in inputs]``, each call after the first on a stream of its own, every
    result ready on the caller's stream when this returns (the caller's later work waits for
    them). Each call's kernels are those it launches on the caller's stream, in the same order:
    only their overlap changes. Autograd runs each call's backward on the stream of its
    forward, with the synchronisation it needs, so a training step overlaps in both passes.
    Off CUDA, the plain list."""
    if not inputs or not inputs[0].is_cuda:
        return [fn(x) for x in inputs]
    device = inputs[0].device
    caller = torch.cuda.current_stream(device)
    outputs = [fn(inputs[0])]
    streams = side_streams(device, len(inputs) - 1)
    for x, stream in zip(inputs[1:], streams, strict=True):
        stream.wait_stream(caller)  # x and the weights were made on the caller's stream
        with torch.cuda.stream(stream):
            outputs.append(fn(x))
        x.record_stream(stream)  # x's memory is not reused until the stream is done with it
    for stream in streams:
        caller.wait_stream(stream)
    for out in outputs[1:]:
        out.record_stream(caller)
    return outputs
