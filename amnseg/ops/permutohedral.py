"""Fully connected CRF mean field in PyTorch, on any device: pydensecrf's algorithm.

pydensecrf (Krähenbühl and Koltun, NIPS 2011) filters with the permutohedral lattice of Adams,
Baek and Davis (Eurographics 2010): each point's feature vector is lifted onto a lattice whose
vertices carry the values (splat), the vertex values are blurred along the lattice's d + 1
axes with the kernel (1/2, 1, 1/2), and read back at the points (slice). This module builds
the same lattice (same elevation, rounding, simplex ranks and barycentric weights in float32, so
the same vertices and weights) and runs the same mean-field update as ``DenseCRF::inference``
with symmetric kernel normalisation and Potts compatibilities, as tensor operations, so that
it runs on a GPU (pydensecrf is one CPU core's C++: ~0.3 s for each VOC-size CRF's 10 steps,
benchmarks/RESULTS.md). On a CPU it is slower than pydensecrf, which stays the default there.

It is not bit-identical to pydensecrf: the sums over a vertex's points run in another order
(atomically on a GPU) and ``exp`` differs in the last bit, so marginals agree to ~1e-6 (5e-4 at
worst measured) and label maps differ only where two labels' marginals tie to that precision
(tests/test_permutohedral.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from amnseg.config import CrfConfig
from amnseg.errors import AmnsegError


class PermutohedralLattice:
    """Gaussian filtering of values at N points with d-dimensional features (unit std. dev.).

    ``features``: (N, d) float32, already divided by the kernel's standard deviations.
    ``filter(values)``: (N, V) -> (N, V), the approximate sum over all points j of
    exp(-|f_i - f_j|^2 / 2) * values_j (point i itself included), as pydensecrf's
    ``Permutohedral::compute``. ``groups`` (N,) int64, optional: points of different groups
    (images) never meet, as if each group had a lattice of its own; one filter call serves all.
    """

    def __init__(self, features: torch.Tensor, groups: torch.Tensor | None = None):
        if features.dim() != 2 or features.dtype != torch.float32:
            raise ValueError(f"features must be (N, d) float32, got {features.dtype} "
                             f"{tuple(features.shape)}")
        count, dims = features.shape
        self.dims = dims
        self.weights, keys = _simplex_vertices(features)
        if groups is None:
            groups = torch.zeros(count, dtype=torch.int64, device=features.device)
        # The group is a key's first coordinate, which the blur never changes.
        keys = torch.cat([groups.view(count, 1, 1).expand(count, dims + 1, 1), keys], dim=2)
        # Vertex ids: the distinct keys in sorted order (pydensecrf numbers them by first use;
        # the numbering changes nothing but the order of float sums).
        packed, self._lows, self._spans = _pack(keys.reshape(-1, dims + 1))
        self._keys, vertex = torch.unique(packed, sorted=True, return_inverse=True)
        # Row 0 of the vertex values stays zero: it stands for "no such vertex".
        self.offsets = vertex.view(count, dims + 1) + 1
        self.vertices = len(self._keys)
        self.neighbours = self._blur_neighbours()
        # pydensecrf's "alpha": the slice's scale so that the lattice's blur has unit gain.
        self.alpha = float(np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** -dims))
        self._slice_weights = (self.weights * self.alpha)[:, :, None]

    def _blur_neighbours(self) -> torch.Tensor:
        """(d + 1, 2, M + 1) row indices of each vertex's two neighbours along each axis
        (0 where the neighbour is not a vertex; row 0's are 0)."""
        dims = self.dims
        coords = _unpack(self._keys, self._lows, self._spans)  # (M, 1 + d): group, key
        rows = []
        for axis in range(dims + 1):
            lower, upper = coords - 1, coords + 1
            lower[:, 0] = upper[:, 0] = coords[:, 0]
            if axis < dims:  # the (d+1)-th coordinate is implied by the others
                lower[:, 1 + axis] = coords[:, 1 + axis] + dims
                upper[:, 1 + axis] = coords[:, 1 + axis] - dims
            rows.append(torch.stack([self._find(lower), self._find(upper)]))
        found = torch.stack(rows)
        return torch.nn.functional.pad(found, (1, 0))  # row 0 -> 0

    def _find(self, coords: torch.Tensor) -> torch.Tensor:
        """Row (vertex id + 1) of each key of ``coords`` (K, d); 0 for keys that are no vertex."""
        inside = ((coords >= self._lows) & (coords < self._lows + self._spans)).all(dim=1)
        packed = _pack_with(coords, self._lows, self._spans)  # another key's code if not inside
        position = torch.searchsorted(self._keys, packed).clamp(max=self.vertices - 1)
        found = inside & (self._keys[position] == packed)
        return torch.where(found, position + 1, torch.zeros_like(position))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """(N, V) float32 -> (N, V): splat, blur along every axis, slice."""
        width = values.shape[1]
        lattice = values.new_zeros(self.vertices + 1, width)
        lattice.index_add_(0, self.offsets.reshape(-1),
                           (self.weights[:, :, None] * values[:, None, :]).reshape(-1, width))
        for pair in self.neighbours:  # (2, M + 1) rows: one gather for both neighbours
            lattice = torch.add(lattice, lattice[pair].sum(dim=0), alpha=0.5)
        return (self._slice_weights * lattice[self.offsets]).sum(dim=1)


def _simplex_vertices(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The enclosing simplex of each point on the lattice (Adams et al. 2010, section 3.1).

    Returns the (N, d + 1) float32 barycentric weights of its d + 1 vertices and their
    (N, d + 1, d) int64 keys (a vertex's first d lattice coordinates). The float32 operations
    follow pydensecrf's order, so that a point on the edge of two simplices falls in the same one.
    """
    count, dims = features.shape
    device = features.device
    inv_std_dev = np.float32(np.sqrt(2.0 / 3.0) * (dims + 1))
    scale = torch.tensor(
        [np.float32(1.0 / np.sqrt((i + 2) * (i + 1)) * np.float64(inv_std_dev))
         for i in range(dims)], dtype=torch.float32, device=device)
    scaled = features * scale
    # Elevation onto the hyperplane sum = 0 of R^(d+1).
    elevated = features.new_empty(count, dims + 1)
    running = features.new_zeros(count)
    for axis in range(dims, 0, -1):
        elevated[:, axis] = running - axis * scaled[:, axis - 1]
        running = running + scaled[:, axis - 1]
    elevated[:, 0] = running
    # The nearest remainder-0 lattice point, then the simplex: coordinates ranked by residual.
    down = np.float32(1.0) / np.float32(dims + 1)
    rounded = torch.round(elevated * down)  # half to even, as SSE's rounding
    rem0 = rounded * (dims + 1)
    residual = elevated - rem0
    smaller = residual[:, :, None] < residual[:, None, :]  # [n, i, j]: r_i < r_j
    later = torch.ones(dims + 1, dims + 1, dtype=torch.bool, device=device).triu(1)
    rank = (smaller & later).sum(2) + (~smaller.transpose(1, 2) & later.T).sum(2)
    rank = rank + rounded.sum(1, keepdim=True).long()
    wrap = (rank < 0).long() - (rank > dims).long()
    rank = rank + wrap * (dims + 1)
    rem0 = rem0 + wrap * (dims + 1)
    # Barycentric weights: each coordinate's residual between the ranks it separates.
    residual = (elevated - rem0) * down
    barycentric = features.new_zeros(count, dims + 2)
    barycentric.scatter_add_(1, dims - rank, residual)
    barycentric.scatter_add_(1, dims - rank + 1, -residual)
    barycentric[:, 0] = barycentric[:, 0] + (1 + barycentric[:, dims + 1])
    # Vertex r of the simplex: rem0 plus the canonical simplex's vertex r, permuted by rank.
    remainder = torch.arange(dims + 1, device=device)
    canonical = torch.where(remainder[None, :] <= dims - remainder[:, None],
                            remainder[:, None], remainder[:, None] - (dims + 1))  # [r, k]
    keys = rem0[:, None, :dims].long() + canonical[:, rank[:, :dims]].permute(1, 0, 2)
    return barycentric[:, :dims + 1].contiguous(), keys


def _pack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, d) int64 keys -> (K,) int64 codes in mixed radix over the keys' ranges, with the
    ranges' (d,) lows and spans."""
    lows = keys.amin(dim=0)
    spans = keys.amax(dim=0) - lows + 1
    if float(np.prod(spans.double().cpu().numpy())) >= 2.0 ** 62:
        raise AmnsegError(f"CRF lattice: {keys.shape[1]}-d keys spanning "
                          f"{spans.tolist()} do not fit 62 bits (kernel widths too small "
                          "for the image?)")
    return _pack_with(keys, lows, spans), lows, spans


def _radix(spans: torch.Tensor) -> torch.Tensor:
    """Place values of the mixed-radix code: the last coordinate varies fastest."""
    ones = torch.ones_like(spans[:1])
    return torch.cat([spans.flip(0)[:-1].cumprod(0).flip(0), ones])


def _pack_with(keys: torch.Tensor, lows: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    return ((keys - lows) * _radix(spans)).sum(dim=1)


def _unpack(codes: torch.Tensor, lows: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_with`: (K,) codes -> (K, d) keys."""
    return codes[:, None] // _radix(spans) % spans + lows


def _divided(values: torch.Tensor, divisor: float) -> torch.Tensor:
    # A true float32 division, as pydensecrf's: CUDA turns division by a Python scalar into
    # multiplication by its reciprocal, which rounds differently.
    return values / torch.full((), divisor, dtype=torch.float32, device=values.device)


class DenseCrf:
    """The two kernels of pydensecrf's ``DenseCRF2D`` for each of a batch of images, ready for
    mean field: what each image's own CRF object would hold, in one lattice per kernel.

    ``images``: (H_b, W_b, 3) uint8 RGB tensors on the device to compute on. Kernels (symmetric
    normalisation, Potts compatibility): Gaussian over positions / ``gaussian_sxy`` and
    bilateral over (positions / ``bilateral_sxy``, RGB / ``bilateral_srgb``).
    """

    def __init__(self, images: Sequence[torch.Tensor], params: CrfConfig):
        device = images[0].device
        self.sizes = [image.shape[0] * image.shape[1] for image in images]
        positions = torch.cat([_positions(*image.shape[:2], device) for image in images])
        colours = torch.cat([image.reshape(-1, 3) for image in images]).float()
        groups = torch.repeat_interleave(torch.arange(len(images), device=device),
                                         torch.tensor(self.sizes, device=device))
        self.kernels = []
        for features, compat in (
            (_divided(positions, params.gaussian_sxy), params.gaussian_compat),
            (torch.cat([_divided(positions, params.bilateral_sxy),
                        _divided(colours, params.bilateral_srgb)], dim=1),
             params.bilateral_compat),
        ):
            lattice = PermutohedralLattice(features, groups)
            density = lattice.filter(torch.ones_like(features[:, :1]))
            norm = (1.0 / torch.sqrt(density.double() + 1e-20)).float()  # (N, 1)
            self.kernels.append((lattice, norm, float(np.float32(compat))))

    def inference(self, unaries: Sequence[torch.Tensor], iterations: int) -> list[torch.Tensor]:
        """Mean-field marginals of C CRFs on each image's kernels: ``unaries[b]`` is image b's
        (C, L_b, N_b) float32 unary energies (negative log-probabilities), the result its
        (C, L_b, N_b) marginals. Images with fewer labels than the most are padded with labels
        of probability 0, which add only zeros: each result is that of the image alone, up to
        the order of float sums."""
        if len(unaries) != len(self.sizes):
            raise ValueError(f"unaries for {len(unaries)} images, kernels for {len(self.sizes)}")
        crfs = unaries[0].shape[0]
        most = max(u.shape[1] for u in unaries)
        scores = []
        for unary, size in zip(unaries, self.sizes, strict=True):
            if unary.dim() != 3 or unary.shape[0] != crfs or unary.shape[2] != size:
                raise ValueError(f"unaries of shape {tuple(unary.shape)} for an image of "
                                 f"{size} pixels and {crfs} CRFs")
            padded = unary.new_full((crfs, most, size), -torch.inf)
            padded[:, :unary.shape[1]] = -unary
            scores.append(padded.permute(2, 0, 1))  # (N_b, C, L)
        scores = torch.cat(scores)
        marginals = torch.softmax(scores, dim=2)
        for _ in range(iterations):
            update = scores
            for lattice, norm, compat in self.kernels:
                message = lattice.filter((marginals * norm[:, :, None]).flatten(1))
                update = update + compat * (message.view_as(marginals) * norm[:, :, None])
            marginals = torch.softmax(update, dim=2)
        return [part.permute(1, 2, 0)[:, :unary.shape[1]]
                for part, unary in zip(marginals.split(self.sizes), unaries, strict=True)]


def _positions(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H * W, 2) float32 (x, y) of every pixel, row by row."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                                torch.arange(width, dtype=torch.float32, device=device),
                                indexing="ij")
    return torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=1)
