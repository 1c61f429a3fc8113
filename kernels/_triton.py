"""``triton`` and ``triton.language``, or stand-ins when Triton is not installed.

The kernel modules import both from here, so that they (and the ``dfine::*_triton`` torch.library
ops they define) import without Triton; launching a kernel then raises a clear error. The
backend choice (``dfine.ops._backend``) refuses ``backend="triton"`` without Triton before that.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the C++ and reference backends work without Triton
    HAS_TRITON = False

    _MESSAGE = "the Triton kernels of dfine need the `triton` package (pip install triton)"

    class _MissingKernel:
        """What ``@triton.jit`` returns without Triton: fails when launched."""

        def __init__(self, fn):
            self.fn = fn
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid):
            return self

        def __call__(self, *args, **kwargs):
            raise RuntimeError(f"{self.__name__}: {_MESSAGE}")

    class _MissingTriton:
        @staticmethod
        def jit(fn=None, **kwargs):
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        def __getattr__(self, name):
            raise RuntimeError(f"triton.{name}: {_MESSAGE}")

    triton = _MissingTriton()
    tl = _MissingTriton()

__all__ = ["triton", "tl", "HAS_TRITON"]
