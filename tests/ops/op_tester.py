"""One pattern for testing a fused op against its plain-PyTorch reference.

Modelled on the shape of torchvision's ``RoIOpTester``: a base class holds the generic tests and
parametrises them; a small subclass per op (``class TestMsDeformAttn(OpTester)``) only declares

* ``op`` / ``reference``: ``op(**inputs, backend=...)`` and ``reference(**inputs)`` (staticmethods);
* ``differentiable``: the names of the inputs that get gradients (a case may narrow them);
* ``tolerances``: ``{dtype: {"forward": Tol, "backward": Tol}}``, a ``(backend, dtype)`` key overrides;
* named cases, methods ``case_<name>(self, dtype, device) -> Call``, optionally decorated with
  ``@case(dtypes=..., heavy=...)``. Required: ``random``, ``single`` (one element), ``empty``
  (N = 0; every ``empty*`` case gets the emptiness checks), ``non_contiguous`` (default: strided
  copies of ``random``'s tensors; every ``non_contiguous*`` case gets the layout checks) and
  ``gradcheck`` (small, float64; every ``gradcheck*`` case is gradchecked);
* ``bad_arguments``: ``[BadArg(id, mutate, exc, match)]``, mutations of ``bad_argument_inputs(device)``
  (default: the inputs of the case named by ``bad_argument_case``, "single");
* optionally ``supports(backend, device, dtype)``, ``gradcheck_kwargs`` and
  ``interpreter_forward_cases`` (the cases test_forward runs under the slow Triton interpreter).

For every backend that can run here (``cpp``; ``triton`` under TRITON_INTERPRET=1) and every device
(``cpu``, and ``cuda`` when there is one), the base class supplies

    test_forward[case]       outputs vs the reference: shape, dtype, values (no autograd recording)
    test_backward[case]      outputs and the gradients of the differentiable inputs vs the reference
                             (both over every case but the empty*, non_contiguous* and gradcheck* ones)
    test_gradcheck[case]     torch.autograd.gradcheck in float64 (fast mode under the Triton interpreter)
    test_non_contiguous      strided inputs and upstream gradients: vs the reference, and the same
                             results as the contiguous copies
    test_empty               N = 0: no output elements (0 for a reduction), zero gradients of the right shape
    test_bad_argument[id]    the error (type and message) names the offending argument; backends
                             reference, cpp, triton
    test_bad_backend_name    backend="cuda" (not a backend name) is a ValueError naming ``backend``

Backends come from ``tests.conftest.require_backend`` (skipped locally, a failure in CI when missing).
Every fused call runs with RuntimeWarning as an error (under the Triton interpreter an unguarded
float->int cast of a huge coordinate shows up as numpy's "invalid value encountered in cast").
Half-precision cases are compared with the reference run in float64 on the same values.
``heavy`` cases (large shapes) run on compiled kernels only: not under the Triton interpreter.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import pytest
import torch

from dfine.ops import _backend
from tests.conftest import devices, require_backend

FUSED_BACKENDS = ("cpp", "triton")
HALF_DTYPES = (torch.float16, torch.bfloat16)
REQUIRED_CASES = ("random", "single", "empty", "non_contiguous", "gradcheck")
SPECIAL_CASES = ("empty", "non_contiguous", "gradcheck")  # name prefixes of the cases with their own test


_WARMED_UP = set()  # (test class, backend, device) that made a valid call before the bad ones


def interpreted(backend: str, device: str) -> bool:
    """Whether Triton kernels run under its (slow) interpreter: always for CPU tensors; for CUDA
    tensors too when TRITON_INTERPRET=1 (tests/conftest.py sets it unless it is set already)."""
    return backend == "triton" and (device == "cpu" or _backend.triton_interpret())


def require(backend: str, device: str) -> None:
    """Skip locally, fail in CI, when ``backend`` cannot run tensors of ``device`` here."""
    require_backend(backend, device)


def _marks(device: str):
    return [pytest.mark.cuda] if device == "cuda" else []


@dataclass(frozen=True)
class Tol:
    """``|got - want| <= atol' + rtol * |want|`` elementwise, ``atol' = atol * max(1, max|want|)``
    when ``scaled`` (gradients whose entries can be near zero next to large ones), else ``atol``."""

    rtol: float
    atol: float
    scaled: bool = False


@dataclass
class Call:
    """The inputs of one named case and what to check on them."""

    inputs: Dict[str, Any]  # keyword arguments of op and reference (tensors and plain values)
    grad: Optional[Tuple[str, ...]] = None  # inputs that get gradients (default: the class's `differentiable`)
    # of those, the gradients compared with the reference's (default: all); the others must be finite
    compare_grad: Optional[Tuple[str, ...]] = None
    reference_inputs: Dict[str, Any] = field(default_factory=dict)  # what the reference gets instead
    tol: Dict[str, Tol] = field(default_factory=dict)  # "forward"/"backward" tolerance of this case
    # expect(inputs, outputs, grads): facts of the op on this case, asserted on the fused and on the
    # reference results (grads is {} in forward-only tests)
    expect: Optional[Callable] = None
    # outputs and compared gradients may hold NaN, at exactly the reference's NaN positions
    equal_nan: bool = False
    dtype: Optional[torch.dtype] = None  # set by the base class from the case's dtype


@dataclass(frozen=True)
class BadArg:
    id: str
    mutate: Callable[[Dict[str, Any]], Dict[str, Any]]  # good inputs (a copy) -> bad inputs
    exc: Any  # exception type(s)
    match: str  # regex the message must contain (the base also checks that it names one of the op's arguments)


def case(*, dtypes: Sequence[torch.dtype] = (torch.float32,), heavy: bool = False):
    """Declare the dtypes a ``case_*`` method is run in, and whether it is too big for the interpreter."""

    def mark(fn):
        fn.case_dtypes = tuple(dtypes)
        fn.case_heavy = heavy
        return fn

    return mark


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` in a non-contiguous view (every other element of a larger buffer)."""
    buf = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)
    view = buf[..., 1]
    view.copy_(t)
    return view


def _as_call(made) -> Call:
    """A case method returns a Call, or just its inputs (a dict)."""
    return made if isinstance(made, Call) else Call(inputs=made)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_tuple(out) -> Tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class OpTester:
    op: Callable = None
    reference: Callable = None
    differentiable: Tuple[str, ...] = ()
    tolerances: Dict[Any, Dict[str, Tol]] = {}
    bad_arguments: Sequence[BadArg] = ()
    bad_argument_case: str = "single"
    gradcheck_kwargs: Dict[str, Any] = dict(eps=1e-6, atol=1e-5, rtol=1e-3)
    # the cases test_forward runs under the Triton interpreter (None: all). test_backward compares the
    # outputs too (recorded for autograd), so this only trims the no-grad runs of a slow kernel
    interpreter_forward_cases: Optional[Tuple[str, ...]] = None
    upstream_seed: int = 123

    # ---- declarations a subclass may refine ------------------------------------------------

    def supports(self, backend: str, device: str, dtype: torch.dtype) -> bool:
        """Whether ``backend`` computes ``dtype`` on ``device`` at all (else the case is not generated)."""
        return True

    @case()
    def case_non_contiguous(self, dtype, device):
        call = _as_call(self.case_random(dtype, device))
        inputs = {k: strided_copy(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in call.inputs.items()}
        return replace(call, inputs=inputs)

    def bad_argument_inputs(self, device: str) -> Dict[str, Any]:
        """Valid float32 inputs that ``bad_arguments`` mutate (default: those of ``bad_argument_case``)."""
        return self.make_call(self.bad_argument_case, torch.float32, device).inputs

    # ---- collection ------------------------------------------------------------------------

    @classmethod
    def case_names(cls):
        names = []
        for klass in reversed(cls.__mro__):
            for name in vars(klass):
                if name.startswith("case_") and name != "case_names" and name[5:] not in names:
                    names.append(name[5:])
        missing = [n for n in REQUIRED_CASES if n not in names]
        if missing:
            raise TypeError(f"{cls.__name__} must declare the cases {missing} (methods case_<name>)")
        return names

    def _case_params(self, select, forward_only=False):
        params = []
        for name in self.case_names():
            method = getattr(self, f"case_{name}")
            dtypes = getattr(method, "case_dtypes", (torch.float32,))
            heavy = getattr(method, "case_heavy", False)
            if not select(name):
                continue
            for backend in FUSED_BACKENDS:
                for device in devices():
                    slow = interpreted(backend, device)
                    if slow and heavy:
                        continue  # the interpreter is too slow for big shapes
                    if (slow and forward_only and self.interpreter_forward_cases is not None
                            and name not in self.interpreter_forward_cases):
                        continue
                    for dtype in dtypes:
                        if self.supports(backend, device, dtype):
                            params.append(pytest.param(backend, device, name, dtype, marks=_marks(device),
                                                       id=f"{backend}-{device}-{name}-{_dtype_name(dtype)}"))
        return params

    def pytest_generate_tests(self, metafunc):
        test = metafunc.definition.originalname
        argnames = ("backend", "device", "case_name", "dtype")
        selectors = {
            "test_forward": lambda name: not name.startswith(SPECIAL_CASES),
            "test_backward": lambda name: not name.startswith(SPECIAL_CASES),
            "test_gradcheck": lambda name: name.startswith("gradcheck"),
            "test_non_contiguous": lambda name: name.startswith("non_contiguous"),
            "test_empty": lambda name: name.startswith("empty"),
        }
        if test in selectors:
            metafunc.parametrize(argnames, self._case_params(selectors[test], forward_only=test == "test_forward"))
        elif test == "test_bad_argument":
            metafunc.parametrize(
                ("backend", "device", "bad"),
                [pytest.param(b, d, bad, id=f"{b}-{d}-{bad.id}", marks=_marks(d))
                 for b in ("reference",) + FUSED_BACKENDS for d in devices() for bad in self.bad_arguments],
            )
        elif test == "test_bad_backend_name":
            metafunc.parametrize("device", [pytest.param(d, id=d, marks=_marks(d)) for d in devices()])

    # ---- running ---------------------------------------------------------------------------

    def make_call(self, name: str, dtype: torch.dtype, device: str) -> Call:
        call = _as_call(getattr(self, f"case_{name}")(dtype, device))
        call.dtype = dtype
        if call.grad is None:
            call.grad = tuple(n for n in self.differentiable if isinstance(call.inputs.get(n), torch.Tensor))
        if call.compare_grad is None:
            call.compare_grad = call.grad
        for key, value in call.inputs.items():
            if isinstance(value, torch.Tensor) and value.device.type != torch.device(device).type:
                raise AssertionError(f"case {name}: input {key} is on {value.device}, not {device}")
        return call

    def upstream(self, outputs, dtype, strided=False):
        """Seeded upstream gradients for ``outputs`` (the same values for fused and reference runs)."""
        gen = torch.Generator().manual_seed(self.upstream_seed)
        grads = []
        for o in outputs:
            g = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype).to(o.dtype).to(o.device)
            grads.append(strided_copy(g) if strided and g.dim() else g)
        return grads

    def run(self, fn, inputs, grad_names=(), dtype=torch.float32, strided_upstream=False, fused=True):
        """Outputs (a tuple) and ``{name: gradient}`` of ``sum(outputs * upstream)`` (zeros where unused)."""
        leaves = {n: inputs[n].detach().requires_grad_(True) for n in grad_names}
        with warnings.catch_warnings():
            if fused:
                warnings.simplefilter("error", RuntimeWarning)
            if grad_names:
                outputs = _as_tuple(fn(**{**inputs, **leaves}))
            else:
                with torch.no_grad():
                    outputs = _as_tuple(fn(**inputs))
            grads = {}
            if grad_names:
                pairs = [(o, g) for o, g in zip(outputs, self.upstream(outputs, dtype, strided_upstream))
                         if o.requires_grad]
                got = (torch.autograd.grad([o for o, _ in pairs], list(leaves.values()), [g for _, g in pairs],
                                           allow_unused=True) if pairs else [None] * len(leaves))
                grads = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(leaves, got)}
        return tuple(o.detach() for o in outputs), grads

    def fused_fn(self, backend):
        op = type(self).op
        return lambda **kw: op(**kw, backend=backend)

    def reference_fn(self):
        return type(self).reference

    def reference_inputs(self, call: Call):
        """The reference's inputs: the case's overrides, in float64 for half-precision cases."""
        inputs = {**call.inputs, **call.reference_inputs}
        if call.dtype in HALF_DTYPES:
            inputs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in inputs.items()}
        return inputs

    def tol(self, kind: str, backend: str, call: Call) -> Tol:
        if kind in call.tol:
            return call.tol[kind]
        table = self.tolerances.get((backend, call.dtype)) or self.tolerances[call.dtype]
        return table[kind]

    @staticmethod
    def assert_close(got, want, tol: Tol, what: str, equal_nan: bool = False):
        assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        atol = tol.atol
        finite = want[torch.isfinite(want)]
        if tol.scaled and finite.numel():
            atol *= max(1.0, finite.abs().max().item())
        torch.testing.assert_close(got.to(want.dtype), want, rtol=tol.rtol, atol=atol, equal_nan=equal_nan,
                                   msg=lambda m: f"{what}: {m}")

    def _check_dtype(self, call, got, want, what):
        expected = call.dtype if call.dtype in HALF_DTYPES and want.dtype == torch.float64 else want.dtype
        assert got.dtype == expected, f"{what}: dtype {got.dtype}, expected {expected}"

    def check_against_reference(self, call: Call, backend: str, with_grads=True, strided_upstream=False):
        """Run the fused op and the reference on ``call``; compare outputs (and gradients). Returns
        the fused (outputs, grads)."""
        grad_names = call.grad if with_grads else ()
        out, grads = self.run(self.fused_fn(backend), call.inputs, grad_names, call.dtype, strided_upstream)
        ref_out, ref_grads = self.run(self.reference_fn(), self.reference_inputs(call), grad_names, call.dtype,
                                      fused=False)
        assert len(out) == len(ref_out), f"{len(out)} outputs, the reference has {len(ref_out)}"
        for i, (o, r) in enumerate(zip(out, ref_out)):
            self._check_dtype(call, o, r, f"output {i}")
            self.assert_close(o, r, self.tol("forward", backend, call), f"output {i}", call.equal_nan)
        for name in grad_names:
            g, r = grads[name], ref_grads[name]
            assert g.shape == call.inputs[name].shape, f"grad {name}: shape {tuple(g.shape)}"
            self._check_dtype(call, g, r, f"grad {name}")
            if name in call.compare_grad:
                self.assert_close(g, r, self.tol("backward", backend, call), f"grad {name}", call.equal_nan)
            else:
                assert torch.isfinite(g).all(), f"grad {name} is not finite"
        if call.expect is not None:
            call.expect(call.inputs, out, grads)
            call.expect(self.reference_inputs(call), ref_out, ref_grads)
        return out, grads

    # ---- the generic tests -----------------------------------------------------------------

    def test_forward(self, backend, device, case_name, dtype):
        require(backend, device)
        self.check_against_reference(self.make_call(case_name, dtype, device), backend, with_grads=False)

    def test_backward(self, backend, device, case_name, dtype):
        require(backend, device)
        call = self.make_call(case_name, dtype, device)
        assert call.grad, f"case {case_name} has no differentiable input"
        self.check_against_reference(call, backend)

    def test_gradcheck(self, backend, device, case_name, dtype):
        require(backend, device)
        call = self.make_call(case_name, dtype, device)
        assert dtype == torch.float64 and call.grad, "gradcheck cases are float64 with differentiable inputs"
        names = call.grad
        fn = self.fused_fn(backend)

        def of_differentiable(*diff):
            return fn(**{**call.inputs, **dict(zip(names, diff))})

        args = tuple(call.inputs[n].detach().clone().requires_grad_(True) for n in names)
        # under the Triton interpreter, one vJP per output element would take minutes: fast mode checks
        # the Jacobian along random directions instead (a few calls)
        fast = interpreted(backend, device)
        assert torch.autograd.gradcheck(of_differentiable, args, fast_mode=fast, **self.gradcheck_kwargs)

    def test_non_contiguous(self, backend, device, case_name, dtype):
        require(backend, device)
        call = self.make_call(case_name, dtype, device)
        tensors = [v for v in call.inputs.values() if isinstance(v, torch.Tensor)]
        assert any(not t.is_contiguous() for t in tensors), f"case {case_name} has only contiguous inputs"
        out, grads = self.check_against_reference(call, backend, strided_upstream=True)
        dense = replace(call, inputs={k: v.contiguous() if isinstance(v, torch.Tensor) else v
                                      for k, v in call.inputs.items()})
        out_c, grads_c = self.run(self.fused_fn(backend), dense.inputs, call.grad, dtype)
        for i, (o, c) in enumerate(zip(out, out_c)):
            self.assert_close(o, c, Tol(0.0, 0.0), f"output {i}, strided vs contiguous")
        for name in call.grad:  # (atomic adds on a GPU may sum in another order)
            self.assert_close(grads[name], grads_c[name], Tol(1e-6, 1e-6, scaled=True),
                              f"grad {name}, strided vs contiguous")

    def test_empty(self, backend, device, case_name, dtype):
        require(backend, device)
        call = self.make_call(case_name, dtype, device)
        assert call.grad, f"case {case_name} has no differentiable input"
        out, grads = self.check_against_reference(call, backend)
        for i, o in enumerate(out):
            assert o.numel() == 0 or torch.all(o == 0), f"output {i} of an empty input: {o}"
        for name, g in grads.items():
            assert g.shape == call.inputs[name].shape and torch.all(g == 0), f"grad {name}"

    def test_bad_argument(self, backend, device, bad):
        require(backend, device)
        good = self.bad_argument_inputs(device)
        fn = self.fused_fn(backend)
        if (type(self), backend, device) not in _WARMED_UP:
            with torch.no_grad():
                fn(**good)  # a valid call first: later C++ calls try the op before the Python checks
            _WARMED_UP.add((type(self), backend, device))
        with pytest.raises(bad.exc, match=bad.match) as raised:
            fn(**bad.mutate(dict(good)))
        parameters = inspect.signature(type(self).op).parameters
        assert any(re.search(rf"\b{name}\b", str(raised.value)) for name in parameters if name != "backend"), (
            f"the message names none of the op's arguments: {raised.value}")

    def test_bad_backend_name(self, device):
        good = self.bad_argument_inputs(device)
        with pytest.raises(ValueError, match=r"backend must be one of .*got 'cuda'"):
            type(self).op(**good, backend="cuda")
