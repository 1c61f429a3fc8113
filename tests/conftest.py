"""Shared test set-up.

Triton kernels run on CPU tensors only under its interpreter, which must be switched on before
`triton` is imported, so it is set here. In CI (CI=true) the compiled extension and Triton must
be present: a missing backend fails the run instead of skipping its tests.

Devices: the op, model and training tests run on every device present, ``cpu`` and, when
``torch.cuda.is_available()``, ``cuda`` (the ``device`` fixture, or :func:`device_params` for a
parametrisation). The CUDA cases carry the ``cuda`` mark (``pytest -m cuda`` runs only them) and are
never skipped for a missing backend in CI. ``DFINE_TEST_CUDA=1`` (scripts/gpu_check.sh) makes a
session without a visible GPU an error instead of a silent CPU-only run.
"""

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dfine.ops import _backend  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_sessionstart(session):
    if os.environ.get("DFINE_TEST_CUDA") == "1" and not torch.cuda.is_available():
        pytest.exit("DFINE_TEST_CUDA=1 but torch.cuda.is_available() is False: the CUDA cases would not exist",
                    returncode=3)


def devices():
    """The devices the tests run on: ("cpu",), or ("cpu", "cuda") when a GPU is visible."""
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def device_params():
    """``pytest.param`` per device of :func:`devices`, id = the device, the CUDA one marked ``cuda``."""
    return [pytest.param(d, id=d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in devices()]


@contextlib.contextmanager
def exact_fp32(device):
    """On CUDA, fp32 math without TF32 (cuDNN convolutions use it by default), so that the tolerances the
    CPU runs meet hold on the GPU too; nothing on the CPU."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(params=device_params(), scope="module")
def device(request):
    """Each device present (module scope, so module-scoped models can be built per device); fp32 exact on CUDA."""
    with exact_fp32(request.param):
        yield torch.device(request.param)


def require_backend(name: str, device="cpu") -> None:
    """Skip locally, fail in CI, when a fused backend cannot run tensors of ``device`` here."""
    device = torch.device(device)
    if name == "reference":
        return
    if device.type == "cuda":
        if name == "cpp":
            ok, why = _backend.extension_has_cuda(), "dfine._C was built without its CUDA kernels"
            if ok:
                problem = _backend.cuda_arch_problem(device)
                ok, why = problem is None, problem
        else:
            ok, why = _backend.triton_available(), "triton is not installed"
    elif name == "cpp":
        ok, why = _backend.extension_available(), f"dfine._C is not built ({_backend._ext_error})"
    elif name == "triton":
        ok = _backend.triton_available() and _backend.triton_interpret()
        why = "triton is not installed or TRITON_INTERPRET is not 1"
    else:
        raise ValueError(f"unknown backend {name!r}")
    if ok:
        return
    if IN_CI:
        pytest.fail(f"backend {name!r} must run {device.type} tensors in CI: {why}")
    pytest.skip(why)


@pytest.fixture(params=["cpp", "triton"])
def fused_backend(request):
    require_backend(request.param)
    return request.param
