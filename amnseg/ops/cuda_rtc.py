"""CUDA C++ kernels compiled at run time (NVRTC) and launched on PyTorch's current stream
(CUDA driver API), both through ctypes: no compiler or CUDA toolkit at install time.

CUDA builds of PyTorch depend on NVIDIA's NVRTC wheel and the driver provides ``libcuda``, so a
machine that runs PyTorch on a GPU has both. (``torch.cuda._compile_kernel`` does the same but
also wants a CUDA toolkit's headers, which a pip-installed PyTorch lacks.)
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import cache
from pathlib import Path

import torch


class CudaRtcError(RuntimeError):
    """NVRTC or the CUDA driver could not be found, compile or launch."""


def _library_candidates() -> list[str]:
    """Where NVRTC may be: by name (the loader's path), the NVIDIA wheels beside PyTorch, a
    CUDA toolkit."""
    major = (torch.version.cuda or "").split(".")[0]
    names = [f"libnvrtc.so.{major}"] if major else []
    names.append("libnvrtc.so")
    folders = [Path(p) for p in sys.path if p]
    wheels = [str(lib) for folder in folders
              for pattern in ("nvidia/*/lib/libnvrtc.so*", "nvidia/*/*/lib/libnvrtc.so*")
              for lib in sorted(folder.glob(pattern))]
    homes = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    toolkits = [str(lib) for home in homes if home
                for lib in sorted(Path(home).glob("lib64/libnvrtc.so*"))]
    toolkits += [str(lib) for lib in sorted(Path("/usr/local").glob("cuda-*/lib64/libnvrtc.so*"))]
    return [n for n in names + wheels + toolkits if "builtins" not in Path(n).name]


@cache
def nvrtc() -> ctypes.CDLL:
    """The NVRTC library (loaded once)."""
    for candidate in _library_candidates():
        try:
            library = ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        library.nvrtcGetErrorString.restype = ctypes.c_char_p
        return library
    raise CudaRtcError("NVRTC (libnvrtc.so) was not found")


@cache
def driver() -> ctypes.CDLL:
    """The CUDA driver library, initialised (loaded once)."""
    try:
        library = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        raise CudaRtcError(f"the CUDA driver (libcuda.so.1) was not found: {error}") from None
    library.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
    library.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                            ctypes.c_char_p]
    library.cuLaunchKernel.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p]
    library.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    _check_driver(library, library.cuInit(0), "cuInit")
    return library


def _check_driver(library: ctypes.CDLL, result: int, call: str) -> None:
    if result != 0:
        message = ctypes.c_char_p()
        library.cuGetErrorString(result, ctypes.byref(message))
        text = message.value.decode() if message.value else f"error {result}"
        raise CudaRtcError(f"{call}: {text}")


def compile_cubin(source: str, name: str, arch: str) -> bytes:
    """The cubin of ``source`` for ``sm_<arch>`` (e.g. "90"); a compile error raises
    :class:`CudaRtcError` with NVRTC's log. ``name`` names the source in that log."""
    library = nvrtc()

    def check(result: int, call: str) -> None:
        if result != 0:
            raise CudaRtcError(f"{call}: {library.nvrtcGetErrorString(result).decode()}")

    program = ctypes.c_void_p()
    check(library.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0,
                                     None, None), "nvrtcCreateProgram")
    try:
        options = [f"--gpu-architecture=sm_{arch}".encode()]
        result = library.nvrtcCompileProgram(program, len(options),
                                             (ctypes.c_char_p * len(options))(*options))
        if result != 0:
            size = ctypes.c_size_t()
            library.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            library.nvrtcGetProgramLog(program, log)
            raise CudaRtcError(f"{name} does not compile for sm_{arch}:\n"
                               f"{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        check(library.nvrtcGetCUBINSize(program, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        check(library.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        library.nvrtcDestroyProgram(ctypes.byref(program))


class Kernel:
    """A ``__global__`` function ``name`` (declared ``extern "C"``) of ``source``, compiled for
    ``device`` and callable as ``kernel(grid, block, args)`` on PyTorch's current stream; args
    are CUDA tensors (passed as pointers) and Python ints (passed as C ints)."""

    def __init__(self, source: str, name: str, device: torch.device | str):
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        major, minor = torch.cuda.get_device_capability(device)
        cubin = compile_cubin(source, f"{name}.cu", f"{major}{minor}")
        self.device = device
        self.library = driver()
        torch.empty(1, device=device)  # PyTorch makes the device's primary context current
        self.module = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check_driver(self.library, self.library.cuModuleLoadData(
                ctypes.byref(self.module), cubin), "cuModuleLoadData")
        self.function = ctypes.c_void_p()
        _check_driver(self.library, self.library.cuModuleGetFunction(
            ctypes.byref(self.function), self.module, name.encode()), "cuModuleGetFunction")

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int],
                 args: list[torch.Tensor | int]) -> None:
        values = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                if arg.device != self.device:
                    raise CudaRtcError(f"a tensor on {arg.device}, the kernel is on "
                                       f"{self.device}")
                values.append(ctypes.c_void_p(arg.data_ptr()))
            else:
                values.append(ctypes.c_int(arg))
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with torch.cuda.device(self.device):  # the launch goes to the current context
            _check_driver(self.library, self.library.cuLaunchKernel(
                self.function, *grid, *block, 0, stream, ctypes.cast(params, ctypes.c_void_p),
                None), "cuLaunchKernel")
