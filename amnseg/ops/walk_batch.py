"""Many images' random walks as one padded batch: what the GPU walk kernels
(:mod:`amnseg.ops.random_walk_triton`, :mod:`amnseg.ops.random_walk_cuda`) share.

Images of different sizes share a batch by padding: boundary 1 (affinity 0) and maps 0 outside
each image, so padded pixels neither give nor take mass and every image walks exactly as alone.
Portrait images walk transposed (the neighbourhood, the paths and so the transition matrix are
symmetric under transposition), so that 500x375 and 375x500 images share a batch unpadded.
The kernels keep the state in float64 like the CPU path; summation order differs, so results
agree to rounding (~1e-14 relative), not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amnseg.ops.random_walk import affinity_stencil


def pad_batch(
    maps: list[torch.Tensor], boundaries: list[torch.Tensor], classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (K_i, H_i, W_i) maps and (H_i, W_i) boundaries into (B, classes, H, W) float64
    maps (zeros outside) and (B, H, W) float64 boundaries (ones outside), H, W the largest."""
    height = max(boundary.shape[0] for boundary in boundaries)
    width = max(boundary.shape[1] for boundary in boundaries)
    device = boundaries[0].device
    state = torch.zeros((len(maps), classes, height, width), dtype=torch.float64, device=device)
    walls = torch.ones((len(maps), height, width), dtype=torch.float64, device=device)
    for index, (image_maps, boundary) in enumerate(zip(maps, boundaries, strict=True)):
        rows, cols = boundary.shape
        state[index, : image_maps.shape[0], :rows, :cols] = image_maps
        walls[index, :rows, :cols] = boundary
    return state, walls


def fits_32_bit_indices(state_values: int, stencil_values: int) -> bool:
    """Whether the kernels' int32 offsets reach every value: the state's two buffers (read
    and written in turn) and the stencil."""
    return 2 * state_values < 2**31 and stencil_values < 2**31


@dataclass
class WalkBatch:
    """A batch ready for a kernel: ``state`` (B, K, H, W) float64 maps, ``forward``
    (B, D, H, W) and ``degree`` (B, H, W) float64 (:func:`affinity_stencil`), ``classes``
    (B,) int32 (each image's own K_i), and what :meth:`unpack` needs to undo the padding."""

    directions: tuple[tuple[int, int], ...]
    state: torch.Tensor
    forward: torch.Tensor
    degree: torch.Tensor
    classes: torch.Tensor
    inputs: list[torch.Tensor]
    portrait: list[bool]

    @classmethod
    def of(
        cls, maps: list[torch.Tensor], boundaries: list[torch.Tensor], radius: int, beta: float
    ) -> WalkBatch:
        """Pad (K_i, H_i, W_i) maps and (H_i, W_i) boundaries (portrait ones transposed)."""
        portrait = [b.shape[0] > b.shape[1] for b in boundaries]
        inputs = [m.transpose(-1, -2) if turn else m
                  for m, turn in zip(maps, portrait, strict=True)]
        walls_in = [b.t() if turn else b for b, turn in zip(boundaries, portrait, strict=True)]
        state, walls = pad_batch(inputs, walls_in, max(max(m.shape[0] for m in maps), 1))
        directions, forward, degree = affinity_stencil(walls, radius, beta)
        classes = torch.tensor([m.shape[0] for m in maps], dtype=torch.int32,
                               device=state.device)
        batch, height, width = walls.shape
        if not fits_32_bit_indices(state.numel(), forward.numel()):
            raise ValueError(f"a walk batch of {batch} {height}x{width} images is too large for "
                             "32-bit indices; walk fewer images at once")
        return cls(directions, state, forward.contiguous(), degree.contiguous(), classes,
                   inputs, portrait)

    def unpack(self, walked: torch.Tensor) -> list[torch.Tensor]:
        """The walked (B, K, H, W) state as each input's (K_i, H_i, W_i) in its dtype."""
        results = []
        for index, (m, turn) in enumerate(zip(self.inputs, self.portrait, strict=True)):
            result = walked[index, : m.shape[0], : m.shape[1], : m.shape[2]].to(m.dtype)
            results.append(result.transpose(-1, -2).contiguous() if turn else result)
        return results
