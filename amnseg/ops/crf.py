"""Dense CRF refinement of hard label maps (pydensecrf2, METHOD.md section 3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CRFParams:
    """Reference kernel parameters of the seed CRF."""

    iterations: int = 10
    gt_prob: float = 0.7
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0


def crf_refine_labels(
    image: np.ndarray, labels: np.ndarray, num_labels: int, params: CRFParams = CRFParams()
) -> np.ndarray:
    """Refine a hard label map with a fully connected CRF.

    ``image``: (H, W, 3) uint8 RGB; ``labels``: (H, W) ints in [0, num_labels). The unary is
    "unary from labels" (gt_prob, label 0 is a real label, not "unsure"); returns the (H, W)
    int64 argmax of the mean-field marginals after ``params.iterations`` steps.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    height, width = labels.shape
    if num_labels < 2:
        # One label: nothing to refine (and the unary of a single label is degenerate).
        return np.zeros((height, width), dtype=np.int64)
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    unary = unary_from_labels(labels, num_labels, gt_prob=params.gt_prob, zero_unsure=False)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.array(image, dtype=np.uint8, order="C", copy=True),  # it needs a writable buffer
        compat=params.bilateral_compat,
    )
    marginals = np.asarray(crf.inference(params.iterations))
    return marginals.argmax(axis=0).reshape(height, width)
