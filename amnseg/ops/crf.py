"""Dense CRF refinement (pydensecrf2): of hard label maps for the seeds (METHOD.md section 3)
and of the segmentation network's probabilities at test time (section 6).

The kernel parameters are a ``CrfConfig`` (``amnseg.config``), whose defaults are the seed CRF's.
"""

from __future__ import annotations

import numpy as np

from amnseg.config import CrfConfig


def dense_crf(image: np.ndarray, unary: np.ndarray, params: CrfConfig) -> np.ndarray:
    """Mean-field marginals (L, H * W) of a fully connected CRF.

    ``image``: (H, W, 3) uint8 RGB; ``unary``: (L, H * W) float32 negative log-probabilities.
    Kernels: Gaussian (``gaussian_sxy``, ``gaussian_compat``) and bilateral
    (``bilateral_sxy``, ``bilateral_srgb``, ``bilateral_compat``), ``iterations`` steps.
    """
    import pydensecrf.densecrf as dcrf

    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, unary.shape[0])
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.array(image, dtype=np.uint8, order="C", copy=True),  # it needs a writable buffer
        compat=params.bilateral_compat,
    )
    return np.asarray(crf.inference(params.iterations))


def crf_refine_labels(
    image: np.ndarray, labels: np.ndarray, num_labels: int, params: CrfConfig
) -> np.ndarray:
    """Refine a hard label map with a fully connected CRF.

    ``image``: (H, W, 3) uint8 RGB; ``labels``: (H, W) ints in [0, num_labels). The unary is
    "unary from labels" (``params.gt_prob``; label 0 is a real label, not "unsure"); returns the
    (H, W) int64 argmax of the marginals.
    """
    from pydensecrf.utils import unary_from_labels

    height, width = labels.shape
    if num_labels < 2:
        # One label: nothing to refine (and the unary of a single label is degenerate).
        return np.zeros((height, width), dtype=np.int64)
    unary = unary_from_labels(labels, num_labels, gt_prob=params.gt_prob, zero_unsure=False)
    return dense_crf(image, unary, params).argmax(axis=0).reshape(height, width)


def crf_refine_probabilities(image: np.ndarray, probs: np.ndarray, params: CrfConfig) -> np.ndarray:
    """DeepLab's test-time CRF: (C, H, W) softmax probabilities -> (C, H, W) marginals.

    The unary is -log(probs) ("unary from softmax"); ``image`` (H, W, 3) uint8.
    """
    from pydensecrf.utils import unary_from_softmax

    channels, height, width = probs.shape
    unary = unary_from_softmax(np.ascontiguousarray(probs, dtype=np.float32))
    return dense_crf(image, unary, params).reshape(channels, height, width)
