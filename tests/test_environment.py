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


def test_ci_on_a_gpu_machine_sees_the_gpu():
    """The CUDA cases exist only when torch sees a GPU: on a machine whose driver lists one, CI must see it too,
    so that a broken CUDA set-up fails instead of silently testing the CPU alone."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if not IN_CI or smi is None:
        return
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    if listed.returncode == 0 and "GPU " in listed.stdout:
        assert torch.cuda.is_available(), f"nvidia-smi lists {listed.stdout.strip()!r} but torch sees no GPU"
