"""Shared test set-up.

Triton kernels run on CPU tensors only under its interpreter, which must be switched on before
`triton` is imported, so it is set here. In CI (CI=true) the compiled extension and Triton must
be present: a missing backend fails the run instead of skipping its tests.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dfine.ops import _backend  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def require_backend(name: str) -> None:
    """Skip locally, fail in CI, when a fused backend cannot run on CPU tensors here."""
    if name == "cpp":
        ok, why = _backend.extension_available(), f"dfine._C is not built ({_backend._ext_error})"
    elif name == "triton":
        ok = _backend.triton_available() and _backend.triton_interpret()
        why = "triton is not installed or TRITON_INTERPRET is not 1"
    else:
        ok, why = True, ""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"backend {name!r} must be available in CI: {why}")
    pytest.skip(why)


@pytest.fixture(params=["cpp", "triton"])
def fused_backend(request):
    require_backend(request.param)
    return request.param
