"""Dense CRF refinement (pydensecrf2): of hard label maps for the seeds (METHOD.md section 3)
and of the segmentation network's probabilities at test time (section 6).

The kernel parameters are a ``CrfConfig`` (``amnseg.config``), whose defaults are the seed CRF's.
``device=None`` (the default) runs pydensecrf's C++ on the CPU, the reference; a torch device
runs the same algorithm as tensors on that device (``amnseg.ops.permutohedral``: marginals equal
to ~1e-6, at most 5e-4 measured; for GPUs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from amnseg.config import CrfConfig

CrfDevice = torch.device | str | None


def dense_crf_many(
    image: np.ndarray, unaries: Sequence[np.ndarray], params: CrfConfig, device: CrfDevice = None
) -> list[np.ndarray]:
    """Mean-field marginals (L, H * W) of a fully connected CRF for each unary, on one image.

    ``image``: (H, W, 3) uint8 RGB; ``unaries``: (L, H * W) float32 negative log-probabilities,
    the same L for all. Kernels: Gaussian (``gaussian_sxy``, ``gaussian_compat``) and bilateral
    (``bilateral_sxy``, ``bilateral_srgb``, ``bilateral_compat``), ``iterations`` steps. The
    kernels' permutohedral lattices depend on the image alone and can cost as much as the
    inference (the more colours, the more: benchmarks/RESULTS.md), so they are built once and
    each unary runs on them: every result is exactly the one a CRF of its own would give.
    """
    if device is not None:
        return _dense_crf_torch(image, unaries, params, torch.device(device))
    import pydensecrf.densecrf as dcrf

    height, width = image.shape[:2]
    marginals = []
    crf = None
    for unary in unaries:
        if crf is None:
            crf = dcrf.DenseCRF2D(width, height, unary.shape[0])
            crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
            crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
            crf.addPairwiseBilateral(
                sxy=params.bilateral_sxy,
                srgb=params.bilateral_srgb,
                rgbim=np.array(image, dtype=np.uint8, order="C", copy=True),  # writable buffer
                compat=params.bilateral_compat,
            )
        else:
            crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        marginals.append(np.asarray(crf.inference(params.iterations)))
    return marginals


def _torch_crf(images: Sequence[np.ndarray], params: CrfConfig, device: torch.device):
    from amnseg.ops.permutohedral import DenseCrf

    return DenseCrf([torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8)).to(device)
                     for image in images], params)


def _dense_crf_torch(image: np.ndarray, unaries: Sequence[np.ndarray], params: CrfConfig,
                     device: torch.device) -> list[np.ndarray]:
    # The unaries run as one batch: the kernels filter all their labels at once.
    energies = torch.from_numpy(np.stack([np.asarray(u, dtype=np.float32) for u in unaries]))
    marginals = _torch_crf([image], params, device).inference([energies.to(device)],
                                                               params.iterations)[0]
    return list(marginals.cpu().numpy())


def dense_crf(image: np.ndarray, unary: np.ndarray, params: CrfConfig,
              device: CrfDevice = None) -> np.ndarray:
    """Mean-field marginals (L, H * W) of one unary: :func:`dense_crf_many` of one."""
    return dense_crf_many(image, [unary], params, device)[0]


def crf_refine_labels_many(
    image: np.ndarray, label_maps: Sequence[np.ndarray], num_labels: int, params: CrfConfig,
    device: CrfDevice = None,
) -> list[np.ndarray]:
    """Refine hard label maps of one image with a fully connected CRF (its kernels shared).

    ``image``: (H, W, 3) uint8 RGB; each of ``label_maps``: (H, W) ints in [0, num_labels). The
    unary is "unary from labels" (``params.gt_prob``; label 0 is a real label, not "unsure");
    returns the (H, W) int64 argmax of each map's marginals.
    """
    from pydensecrf.utils import unary_from_labels

    if num_labels < 2:
        # One label: nothing to refine (and the unary of a single label is degenerate).
        return [np.zeros(labels.shape, dtype=np.int64) for labels in label_maps]
    if device is not None:
        return crf_refine_labels_batch([image], [label_maps], [num_labels], params, device)[0]
    unaries = [unary_from_labels(labels, num_labels, gt_prob=params.gt_prob, zero_unsure=False)
               for labels in label_maps]
    return [marginals.argmax(axis=0).reshape(labels.shape) for marginals, labels in
            zip(dense_crf_many(image, unaries, params), label_maps, strict=True)]


def crf_refine_labels_batch(
    images: Sequence[np.ndarray], label_maps: Sequence[Sequence[np.ndarray]],
    num_labels: Sequence[int], params: CrfConfig, device: torch.device | str,
) -> list[list[np.ndarray]]:
    """:func:`crf_refine_labels_many` of several images at once, by the PyTorch mean field on
    ``device``: one lattice per kernel for all of them, so a GPU runs few, large operations.
    The unaries are made and the marginals' argmax taken on ``device``; only labels cross."""
    device = torch.device(device)
    refined = [[np.zeros(np.shape(labels), dtype=np.int64) for labels in maps]
               for maps in label_maps]  # one label: nothing to refine
    todo = [k for k, count in enumerate(num_labels) if count >= 2]
    if not todo:
        return refined
    unaries = [_unaries_from_labels(label_maps[k], num_labels[k], params.gt_prob, device)
               for k in todo]
    marginals = _torch_crf([images[k] for k in todo], params, device).inference(
        unaries, params.iterations)
    for k, image_marginals in zip(todo, marginals, strict=True):
        best = image_marginals.argmax(dim=1).cpu().numpy()
        refined[k] = [labels.reshape(np.shape(m)) for labels, m in
                      zip(best, label_maps[k], strict=True)]
    return refined


def _unaries_from_labels(label_maps: Sequence[np.ndarray], num_labels: int, gt_prob: float,
                         device: torch.device) -> torch.Tensor:
    """pydensecrf's "unary from labels" (label 0 a real label) of each map, made on ``device``:
    (maps, L, H * W) float32, -log(gt_prob) at the label and -log((1 - gt_prob) / (L - 1))
    elsewhere, computed in float64 and stored as float32 as pydensecrf does."""
    labels = torch.from_numpy(np.stack([np.asarray(m, dtype=np.int64).reshape(-1)
                                        for m in label_maps])).to(device)
    unaries = torch.full((len(label_maps), num_labels, labels.shape[1]),
                         float(np.float32(-np.log((1.0 - gt_prob) / (num_labels - 1)))),
                         dtype=torch.float32, device=device)
    return unaries.scatter_(1, labels[:, None], float(np.float32(-np.log(gt_prob))))


def crf_refine_labels(
    image: np.ndarray, labels: np.ndarray, num_labels: int, params: CrfConfig,
    device: CrfDevice = None,
) -> np.ndarray:
    """:func:`crf_refine_labels_many` of one label map: (H, W) int64."""
    return crf_refine_labels_many(image, [labels], num_labels, params, device)[0]


def crf_refine_probabilities(image: np.ndarray, probs: np.ndarray, params: CrfConfig,
                             device: CrfDevice = None) -> np.ndarray:
    """DeepLab's test-time CRF: (C, H, W) softmax probabilities -> (C, H, W) marginals.

    The unary is -log(probs) ("unary from softmax"); ``image`` (H, W, 3) uint8.
    """
    from pydensecrf.utils import unary_from_softmax

    channels, height, width = probs.shape
    unary = unary_from_softmax(np.ascontiguousarray(probs, dtype=np.float32))
    return dense_crf(image, unary, params, device).reshape(channels, height, width)
