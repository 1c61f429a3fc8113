"""``triton`` and ``triton.language``, or stand-ins when Triton is not installed.

The kernel modules import both from here, so that they (and the ``dfine::*_triton`` torch.library
ops they define) import without Triton; launching a kernel then raises a clear error. The
backend choice (``dfine.ops._backend``) refuses ``backend="triton"`` without Triton before that.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, List, Optional, Sequence, Union

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

# The interpreter runs kernels in numpy on CPU tensors: nothing to time, so nothing to tune.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_config(block: Dict[str, int], num_warps: int):
    """One candidate launch configuration: block sizes (constexpr arguments) and warps per program."""
    return triton.Config(dict(block), num_warps=num_warps)


class FixedLaunch:
    """A kernel launched with one configuration: the default for its arguments, or the one that
    :meth:`forced` sets. What :func:`autotuned` gives under the interpreter. ``configs`` and ``prune``
    are kept so that tests can run every candidate configuration there."""

    def __init__(self, kernel, configs: Sequence, default: Callable[[dict], dict], prune: Optional[Callable]):
        self.fn = kernel
        self.configs = list(configs)
        self.default = default
        self.prune = prune
        self._forced = None

    @contextlib.contextmanager
    def forced(self, config):
        """Launch every call inside the block with ``config`` (a ``triton.Config``)."""
        previous, self._forced = self._forced, config
        try:
            yield
        finally:
            self._forced = previous

    def candidates(self, named_args: dict) -> List:
        """The configurations autotuning would time for a launch with these arguments."""
        return list(self.prune(self.configs, named_args)) if self.prune else list(self.configs)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = {**dict(zip(self.fn.arg_names, args)), **kwargs}
            meta = dict(self._forced.kwargs) if self._forced is not None else self.default(named)
            shape = grid({**named, **meta}) if callable(grid) else grid
            return self.fn[shape](*args, **kwargs, **meta)

        return launch


def autotuned(configs: Sequence, key: List[str], default: Union[dict, Callable[[dict], dict]],
              prune: Optional[Callable[[List, dict], List]] = None, reset_to_zero: Optional[List[str]] = None):
    """Decorator for a ``@triton.jit`` kernel whose launch parameters (block sizes, ``num_warps``) are
    tuned on the GPU: ``triton.autotune`` over ``configs``, timed once per distinct ``key`` (and the
    argument dtypes), after ``prune(configs, named_args)`` drops the candidates that do not fit the
    call. Under the interpreter (and without Triton) it launches ``default`` instead, a dict of the
    block sizes or a function of the named arguments giving one. Launchers pass the grid as a
    function of the chosen meta-parameters and never pass the tuned block sizes themselves.
    ``reset_to_zero`` names the buffers the kernel accumulates into (zeroed before each timed run)."""
    default_fn = default if callable(default) else (lambda named, d=dict(default): dict(d))

    def wrap(kernel):
        if not HAS_TRITON:
            return kernel  # launching it raises the missing-Triton error
        if INTERPRETED:
            return FixedLaunch(kernel, configs, default_fn, prune)
        early = None
        if prune is not None:
            def early(candidates, named_args, **kwargs):
                return prune(candidates, {**named_args, **kwargs})
        return triton.autotune(configs=list(configs), key=key, reset_to_zero=reset_to_zero,
                               prune_configs_by={"early_config_prune": early} if early else None)(kernel)

    return wrap


# Candidate launch configurations of the row-tile kernels (FDR decode, FGL, DDF): rows per program
# and warps, 16 elements of each [BLOCK, 64] tile per thread (denser tiles spill registers, and the
# decode forward then takes a minute to compile per candidate). The interpreter uses ROW_TILE_DEFAULT.
ROW_TILE_CONFIGS = [launch_config({"BLOCK": rows}, warps) for rows, warps in
                    ((16, 2), (32, 4), (64, 8))] if HAS_TRITON else []
ROW_TILE_DEFAULT = {"BLOCK": 32}


def row_tile_grid(rows: int):
    """The grid of a row-tile kernel over ``rows`` rows, for the chosen ``BLOCK``."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK"]),)


def jit_function(kernel):
    """The ``@triton.jit`` function under an :func:`autotuned` wrapper (what ``triton.compile`` takes)."""
    if isinstance(kernel, FixedLaunch) or (HAS_TRITON and isinstance(kernel, triton.runtime.autotuner.Autotuner)):
        return kernel.fn
    return kernel


# torch dtype -> Triton's name of it in a compile signature
TYPE_NAMES = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}


def cuda_signature(kernel, types: Dict[str, str], pointer: str) -> Dict[str, str]:
    """The ``triton.compile`` signature of ``kernel``: ``types[name]`` where given, ``"constexpr"``
    for constexpr parameters, ``pointer`` for the other ``*_ptr`` parameters."""
    signature = {}
    for param in jit_function(kernel).params:
        if param.name in types:
            signature[param.name] = types[param.name]
        elif param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = pointer
        else:
            raise ValueError(f"cuda_signature: no type for argument {param.name!r} of {jit_function(kernel).__name__}")
    return signature


def compile_for_cuda(kernel, signature: Dict[str, str], constexprs: dict, capability: int = 80,
                     num_warps: int = 4) -> int:
    """Compile ``kernel`` to PTX and cubin for ``sm_<capability>`` without a GPU (the interpreter must be
    off when Triton is imported) and return the PTX size in bytes: proof that the kernel lowers for
    CUDA with these block sizes and warps. Uses the compile API of Triton 3.x."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(kernel)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("compile_for_cuda needs TRITON_INTERPRET unset before triton is imported")
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
    if "cubin" not in compiled.asm:
        raise RuntimeError(f"{fn.__name__} produced no cubin for sm_{capability}")
    return len(compiled.asm["ptx"])


def compile_row_kernels_for_cuda(kernels, constexprs: dict, scalar_types: Dict[str, str], dtypes, capability: int,
                                 tuned_configs: bool) -> Dict[tuple, int]:
    """:func:`compile_for_cuda` for row-tile kernels: every kernel in every (torch) dtype, with the default tile or, with ``tuned_configs``, once per entry of
    ``ROW_TILE_CONFIGS``. ``constexprs`` holds the constexprs other than ``BLOCK`` and ``ACC``.
    Returns ``{(dtype, kernel name + config): PTX bytes}``."""
    tiles = ([(dict(c.kwargs), c.num_warps, f"[BLOCK={c.kwargs['BLOCK']},warps={c.num_warps}]")
              for c in ROW_TILE_CONFIGS] if tuned_configs else [(dict(ROW_TILE_DEFAULT), 4, "")])
    result = {}
    for dtype in dtypes:
        name = TYPE_NAMES[str(dtype).replace("torch.", "")]
        acc = tl.float64 if name == "fp64" else tl.float32
        types = {k: (("fp64" if name == "fp64" else "fp32") if v == "acc" else v) for k, v in scalar_types.items()}
        for kernel in kernels:
            params = {p.name for p in jit_function(kernel).params}
            consts = {k: v for k, v in constexprs.items() if k in params}
            for tile, warps, suffix in tiles:
                signature = cuda_signature(kernel, types, f"*{name}")
                result[(name, jit_function(kernel).__name__ + suffix)] = compile_for_cuda(
                    kernel, signature, {**consts, **tile, "ACC": acc}, capability, warps)
    return result


__all__ = ["triton", "tl", "HAS_TRITON", "INTERPRETED", "autotuned", "launch_config", "FixedLaunch", "jit_function",
           "ROW_TILE_CONFIGS", "ROW_TILE_DEFAULT", "row_tile_grid", "cuda_signature", "compile_for_cuda",
           "TYPE_NAMES", "compile_row_kernels_for_cuda"]
