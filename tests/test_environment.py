import os

import torch

from dfine.ops import _backend
from tests.conftest import IN_CI


def test_ci_has_every_backend():
    """In CI the extension and the Triton interpreter are required, not optional."""
    if not IN_CI:
        return
    assert _backend.extension_available(), f"dfine._C did not import: {_backend._ext_error}"
    assert _backend.triton_available()
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_ci_built_the_cuda_sources():
    """CI builds the CUDA kernels too (they compile here even though no GPU can run them)."""
    if not IN_CI:
        return
    assert _backend.extension_has_cuda(), "CI must compile the CUDA sources (DFINE_WITH_CUDA=1)"
    assert torch.version.cuda is not None
