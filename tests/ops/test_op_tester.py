"""The shared OpTester itself: its checks fail on a wrong op (a toy op, no compiled backend needed)."""

import warnings

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

from tests.ops.op_tester import BadArg, Call, OpTester, Tol, case, strided_copy


def _scale_reference(x, factor=2.0):
    return x * factor


def _scale(x, factor=2.0, backend="auto"):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"scale: x must be a floating-point tensor, got {type(x).__name__}")
    return x * factor


class _Toy(OpTester):
    """x * factor; not collected (no Test prefix): the tests below call its checks directly."""

    op = staticmethod(_scale)
    reference = staticmethod(_scale_reference)
    differentiable = ("x",)
    tolerances = {torch.float32: {"forward": Tol(1e-6, 1e-6), "backward": Tol(1e-6, 1e-6)},
                  torch.float64: {"forward": Tol(1e-12, 1e-12), "backward": Tol(1e-12, 1e-12)}}
    bad_arguments = [BadArg("x_int", lambda a: {**a, "x": a["x"].long()}, TypeError, "must be a floating-point")]

    def case_random(self, dtype, device):
        return dict(x=torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=dtype))

    def case_single(self, dtype, device):
        return dict(x=torch.ones(1, dtype=dtype))

    def case_empty(self, dtype, device):
        return dict(x=torch.zeros(0, 3, dtype=dtype))

    @case(dtypes=(torch.float64,))
    def case_gradcheck(self, dtype, device):
        return dict(x=torch.rand(3, dtype=dtype))


def _with_op(op):
    class Wrong(_Toy):
        pass

    Wrong.op = staticmethod(op)
    return Wrong()


def test_correct_op_passes_every_generic_check():
    toy = _Toy()
    for name in ("random", "single", "non_contiguous"):
        toy.check_against_reference(toy.make_call(name, torch.float32, "cpu"), "reference")
    toy.test_non_contiguous("reference", "cpu", "non_contiguous", torch.float32)
    toy.test_empty("reference", "cpu", "empty", torch.float32)
    toy.test_gradcheck("reference", "cpu", "gradcheck", torch.float64)
    toy.test_bad_argument("reference", "cpu", toy.bad_arguments[0])


def test_a_wrong_output_fails():
    wrong = _with_op(lambda x, factor=2.0, backend="auto": x * factor * (1 + 1e-4))
    with pytest.raises(AssertionError, match="output 0"):
        wrong.test_forward("reference", "cpu", "random", torch.float32)


def test_a_wrong_gradient_fails():
    def op(x, factor=2.0, backend="auto"):
        return x.detach() * factor + (x - x.detach()) * (factor + 0.1)  # right value, wrong derivative

    with pytest.raises(AssertionError, match="grad x"):
        _with_op(op).test_backward("reference", "cpu", "random", torch.float32)
    with pytest.raises(GradcheckError):
        _with_op(op).test_gradcheck("reference", "cpu", "gradcheck", torch.float64)


def test_a_wrong_dtype_fails():
    wrong = _with_op(lambda x, factor=2.0, backend="auto": (x * factor).double())
    with pytest.raises(AssertionError, match="dtype"):
        wrong.test_forward("reference", "cpu", "random", torch.float32)


def test_an_op_that_reads_strided_memory_wrongly_fails():
    def op(x, factor=2.0, backend="auto"):  # reads the underlying buffer as if x were contiguous
        flat = torch.as_strided(x, (x.numel(),), (1,))
        return flat.reshape(x.shape) * factor

    with pytest.raises(AssertionError):
        _with_op(op).test_non_contiguous("reference", "cpu", "non_contiguous", torch.float32)


def test_contiguous_inputs_are_rejected_as_a_non_contiguous_case():
    class Contiguous(_Toy):
        def case_non_contiguous(self, dtype, device):
            return self.case_random(dtype, device)

    with pytest.raises(AssertionError, match="only contiguous inputs"):
        Contiguous().test_non_contiguous("reference", "cpu", "non_contiguous", torch.float32)


def test_an_empty_input_with_a_non_empty_output_fails():
    def op(x, factor=2.0, backend="auto"):
        return x * factor if x.numel() else x.new_ones(1)

    with pytest.raises(AssertionError, match="shape"):
        _with_op(op).test_empty("reference", "cpu", "empty", torch.float32)


def test_a_message_that_names_no_argument_fails():
    class Vague(_Toy):
        bad_arguments = [BadArg("x_int", lambda a: {**a, "x": a["x"].long()}, TypeError, "floating-point")]

    def op(x, factor=2.0, backend="auto"):
        if not x.is_floating_point():
            raise TypeError("expected a floating-point tensor")
        return x * factor

    vague = Vague()
    vague.test_bad_argument("reference", "cpu", vague.bad_arguments[0])  # the toy op names x
    Vague.op = staticmethod(op)
    with pytest.raises(AssertionError, match="names none of the op's arguments"):
        Vague().test_bad_argument("reference", "cpu", vague.bad_arguments[0])


def test_a_runtime_warning_in_a_fused_call_fails():
    def op(x, factor=2.0, backend="auto"):
        warnings.warn("invalid value encountered in cast", RuntimeWarning)
        return x * factor

    with pytest.raises(RuntimeWarning):
        _with_op(op).test_forward("reference", "cpu", "random", torch.float32)


def test_expect_runs_on_fused_and_reference_results():
    seen = []
    toy = _Toy()
    call = Call(dict(x=torch.ones(2)), expect=lambda inputs, outputs, grads: seen.append(outputs[0].sum().item()))
    call.dtype, call.grad, call.compare_grad = torch.float32, ("x",), ("x",)
    toy.check_against_reference(call, "reference")
    assert seen == [4.0, 4.0]


def test_missing_required_cases_are_reported():
    class Incomplete(OpTester):
        def case_random(self, dtype, device):
            return dict(x=torch.ones(1))

    with pytest.raises(TypeError, match=r"\['single', 'empty', 'gradcheck'\]"):
        Incomplete.case_names()


def test_strided_copy_keeps_values_and_is_not_contiguous():
    x = torch.arange(6.0).reshape(2, 3)
    y = strided_copy(x)
    assert torch.equal(x, y) and not y.is_contiguous()


def test_a_visible_gpu_adds_marked_cuda_cases(monkeypatch):
    """With a GPU (mocked here) every case also runs on cuda, marked `cuda` (pytest -m cuda selects them); without
    one the cuda cases do not exist (nothing to skip)."""
    from tests import conftest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert conftest.devices() == ("cpu",)
    assert [p.id for p in _Toy()._case_params(lambda name: name == "random")] == [
        "cpp-cpu-random-float32", "triton-cpu-random-float32"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert conftest.devices() == ("cpu", "cuda")
    params = _Toy()._case_params(lambda name: name == "random")
    assert [p.id for p in params] == ["cpp-cpu-random-float32", "cpp-cuda-random-float32",
                                      "triton-cpu-random-float32", "triton-cuda-random-float32"]
    assert [bool(p.marks) for p in params] == [False, True, False, True]
    assert all(m.name == "cuda" for p in params for m in p.marks)
    assert [(p.values[0], [m.name for m in p.marks]) for p in conftest.device_params()] == [
        ("cpu", []), ("cuda", ["cuda"])]


def test_cuda_cases_fail_in_ci_when_the_backend_cannot_run(monkeypatch):
    """On a GPU machine in CI a CUDA case whose backend cannot run fails; it is never skipped."""
    from dfine.ops import _backend
    from tests import conftest

    monkeypatch.setattr(_backend, "extension_has_cuda", lambda: False)
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="backend 'cpp' must run cuda tensors in CI"):
        conftest.require_backend("cpp", "cuda")
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="without its CUDA kernels"):
        conftest.require_backend("cpp", "cuda")


def test_dfine_test_cuda_without_a_gpu_stops_the_session(monkeypatch):
    from tests import conftest

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("DFINE_TEST_CUDA", "1")
    with pytest.raises(pytest.exit.Exception, match="DFINE_TEST_CUDA=1 but torch.cuda.is_available"):
        conftest.pytest_sessionstart(None)
    monkeypatch.delenv("DFINE_TEST_CUDA")
    conftest.pytest_sessionstart(None)  # without it: no GPU is fine
