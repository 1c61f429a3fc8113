"""Which implementation of a fused op runs: the compiled extension, Triton, or the reference.

Every fused op takes ``backend=`` with one of :data:`BACKENDS`:

* ``"reference"`` - the plain PyTorch definition (always available, the truth);
* ``"cpp"``       - the compiled extension ``dfine._C`` (C++ on CPU tensors, CUDA on CUDA tensors);
* ``"triton"``    - the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``);
* ``"auto"``      - the compiled kernel for the tensors' device, falling back to the reference with
  one warning when the extension was not built. On a GPU that the loaded ``dfine._C`` has no kernel image
  for (compiled for other architectures, ``dfine.ops.cuda_arch``) it falls back to Triton, else the
  reference, with one warning naming the rebuild; ``"cpp"`` raises that error instead.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Dict, Optional

import torch

from dfine.ops import cuda_arch

BACKENDS = ("auto", "reference", "cpp", "triton")

BUILD_HINT = (
    "build it from the repository root with `python setup.py build_ext --inplace` "
    "(or `pip install --no-build-isolation -e .`)"
)

_ext = None
_ext_error: Exception | None = None
_ext_tried = False
_warned_fallback = False
_warned_arch = False
_cuda_arch_problems: Dict[int, Optional[str]] = {}  # GPU index -> None (kernels run there) or the error text


def load_extension():
    """Import ``dfine._C`` once (registering the ``torch.ops.dfine`` kernels); None if not built."""
    global _ext, _ext_error, _ext_tried
    if not _ext_tried:
        _ext_tried = True
        try:  # (torch, imported above, loads libtorch, which the extension links against)
            _ext = importlib.import_module("dfine._C")
        except ImportError as err:  # not built, or built against another torch
            _ext_error = err
    return _ext


def extension_available() -> bool:
    return load_extension() is not None


def extension_has_cuda() -> bool:
    ext = load_extension()
    return ext is not None and bool(ext.with_cuda())


def extension_cuda_targets():
    """The CUDA targets the loaded extension was compiled for (["sm_80", "compute_80"]); None when unknown
    (a binary from before ``cuda_archs()`` existed) or without CUDA kernels."""
    ext = load_extension()
    if ext is None or not ext.with_cuda() or not hasattr(ext, "cuda_archs"):
        return None
    return cuda_arch.parse_targets(ext.cuda_archs())


def cuda_arch_problem(device) -> Optional[str]:
    """None when the extension's CUDA kernels have an image for ``device``'s GPU (or it cannot tell); else
    the message that says how to rebuild. Asked once per GPU."""
    index = _gpu_index(device)
    if index not in _cuda_arch_problems:
        targets = extension_cuda_targets()
        problem = None
        if targets is not None:
            capability = tuple(torch.cuda.get_device_capability(index))
            if not cuda_arch.runs_on(targets, capability):
                problem = cuda_arch.describe_mismatch(targets, capability, torch.cuda.get_device_name(index))
        _cuda_arch_problems[index] = problem
    return _cuda_arch_problems[index]


def require_extension(op_name: str):
    ext = load_extension()
    if ext is None:
        raise RuntimeError(
            f"{op_name}: backend='cpp' needs the compiled extension dfine._C, which could not be "
            f"imported ({_ext_error}); {BUILD_HINT}."
        )
    return ext


def symbolic_shapes() -> bool:
    """True while a graph is being traced for export (``torch.onnx.export``'s TorchScript tracer,
    ``torch.jit.trace``, ``torch.export``): sizes read from tensors are then graph values, and code
    must not turn them into Python constants (no ``int()``, no per-size caches, no shape checks)."""
    if torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting()) if is_exporting is not None else False


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (backend, device type) choices already resolved to "cpp": with the extension loaded the answer
# cannot change, and the fused ops ask on every call (the full checks cost ~1 us of Python per call).
_resolved_cpp: set = set()


def _as_device(device):
    return device if isinstance(device, torch.device) else torch.device(device)


def _gpu_index(device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _cache_key(backend: str, device):
    # per GPU: a machine may hold GPUs of different architectures
    if device.type == "cuda":
        return backend, "cuda", _gpu_index(device)
    return backend, device.type


def resolve_backend(backend: str, device, op_name: str) -> str:
    """Turn the user's ``backend`` choice into one of reference/cpp/triton for ``device``."""
    device = _as_device(device)
    key = _cache_key(backend, device)
    if _ext is not None and key in _resolved_cpp:
        return "cpp"
    which = _resolve_backend(backend, device, op_name)
    if which == "cpp" and _ext is not None:
        _resolved_cpp.add(key)
    return which


def resolved_to_cpp(backend: str, device) -> bool:
    """Whether ``backend`` on ``device`` is known (from an earlier call) to resolve to "cpp"."""
    return _ext is not None and _cache_key(backend, device) in _resolved_cpp


def _resolve_backend(backend: str, device, op_name: str) -> str:
    global _warned_fallback, _warned_arch
    device_type = device.type
    if backend not in BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "cpp":
        require_extension(op_name)
        if device_type == "cuda" and not extension_has_cuda():
            raise RuntimeError(
                f"{op_name}: backend='cpp' got CUDA tensors but dfine._C was built without its CUDA "
                f"sources; rebuild with DFINE_WITH_CUDA=1 on a machine with nvcc ({BUILD_HINT})."
            )
        if device_type not in ("cpu", "cuda"):
            raise RuntimeError(f"{op_name}: backend='cpp' supports cpu and cuda tensors, got {device_type}")
        if device_type == "cuda":
            problem = cuda_arch_problem(device)
            if problem is not None:
                raise RuntimeError(f"{op_name}: backend='cpp': {problem}")
        return "cpp"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op_name}: backend='triton' needs the `triton` package")
        if device_type == "cpu" and not triton_interpret():
            raise RuntimeError(
                f"{op_name}: backend='triton' got CPU tensors; Triton runs CPU tensors only under "
                "the interpreter (set TRITON_INTERPRET=1 before starting Python), use backend='cpp' "
                "for the fast CPU kernel"
            )
        return "triton"
    # auto
    if device_type == "cpu" and extension_available():
        return "cpp"
    if device_type == "cuda" and extension_has_cuda():
        problem = cuda_arch_problem(device)
        if problem is None:
            return "cpp"
        which = "triton" if triton_available() else "reference"
        if not _warned_arch:
            _warned_arch = True
            instead = "the Triton kernels" if which == "triton" else "the slow pure-PyTorch reference ops"
            warnings.warn(f"dfine fused ops: {problem}. Until then backend='auto' runs {instead} on this GPU.",
                          RuntimeWarning, stacklevel=3)
        return which
    if device_type == "cuda" and triton_available():
        return "triton"
    if not _warned_fallback:
        _warned_fallback = True
        reason = (
            f"dfine._C could not be imported ({_ext_error})"
            if not extension_available()
            else f"dfine._C has no kernels for {device_type} tensors"
        )
        warnings.warn(
            f"dfine fused ops: {reason}; backend='auto' falls back to the slow pure-PyTorch "
            f"reference ops. To get the fused kernels, {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"
