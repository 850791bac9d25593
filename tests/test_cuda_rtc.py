"""amnseg.ops.cuda_rtc where no GPU is needed: where NVRTC is looked for, and the errors."""

from __future__ import annotations

import sys

import pytest

from amnseg.ops import cuda_rtc


def test_nvrtc_is_looked_for_in_the_nvidia_wheels_beside_pytorch(tmp_path, monkeypatch):
    for name in ("cu13/lib/libnvrtc.so.13", "cu13/lib/libnvrtc-builtins.so.13.0",
                 "cuda_nvrtc/lib/libnvrtc.so.12"):
        library = tmp_path / "nvidia" / name
        library.parent.mkdir(parents=True, exist_ok=True)
        library.write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    candidates = cuda_rtc._library_candidates()
    assert str(tmp_path / "nvidia/cu13/lib/libnvrtc.so.13") in candidates
    assert str(tmp_path / "nvidia/cuda_nvrtc/lib/libnvrtc.so.12") in candidates
    assert not [c for c in candidates if "builtins" in c]  # a helper library, not NVRTC
    # The loader's own path comes first.
    assert candidates.index("libnvrtc.so") < candidates.index(
        str(tmp_path / "nvidia/cu13/lib/libnvrtc.so.13"))


def test_missing_nvrtc_is_a_cuda_rtc_error(monkeypatch, tmp_path):
    (tmp_path / "libnvrtc.so.99").write_bytes(b"not a library")
    monkeypatch.setattr(cuda_rtc, "_library_candidates",
                        lambda: [str(tmp_path / "libnvrtc.so.99"), "libnvrtc-absent.so"])
    cuda_rtc.nvrtc.cache_clear()
    try:
        with pytest.raises(cuda_rtc.CudaRtcError, match="NVRTC"):
            cuda_rtc.nvrtc()
    finally:
        cuda_rtc.nvrtc.cache_clear()


def test_walk_kernel_is_unavailable_without_nvrtc_and_says_why(monkeypatch):
    """The masks stage then falls back to the Triton kernel: a warning, not an error."""
    import torch

    from amnseg.ops import random_walk_cuda

    def no_kernel(*args):
        raise cuda_rtc.CudaRtcError("NVRTC (libnvrtc.so) was not found")

    monkeypatch.setattr(random_walk_cuda, "compiled_step", no_kernel)
    random_walk_cuda.available.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CUDA walk kernel is not available.*NVRTC"):
            assert not random_walk_cuda.available(torch.device("cuda", 0))
    finally:
        random_walk_cuda.available.cache_clear()
