"""GPU architectures: the build's arch list (dfine/ops/cuda_arch.py, used by setup.py) and the run-time check
that the loaded dfine._C has a kernel image for the GPU, with its fallback. The CUDA queries are mocked: these
tests run on machines without a GPU."""

import os
import shutil
import warnings

import pytest
import torch
from torch.utils import cpp_extension

from dfine.ops import _backend, cuda_arch
from tests.conftest import IN_CI

PORTABLE = "7.5;8.0;8.6;8.9;9.0+PTX"


# ------------------------------------------------------------------------------------------------
# build time


def test_a_set_arch_list_is_kept():
    """CI sets TORCH_CUDA_ARCH_LIST=8.0: one arch, whatever GPUs are visible."""
    chosen, why = cuda_arch.select_arch_list({"TORCH_CUDA_ARCH_LIST": "8.0"}, [(9, 0)], ["7.5", "8.0", "9.0"])
    assert chosen == "8.0" and "set" in why


def test_unset_with_gpus_leaves_the_choice_to_torch():
    chosen, why = cuda_arch.select_arch_list({}, [(9, 0), (7, 5), (9, 0)], ["7.5", "9.0"])
    assert chosen is None  # torch's _get_cuda_arch_flags then compiles for the visible GPUs
    assert "7.5, 9.0" in why


def test_unset_without_gpu_is_a_portable_list_with_ptx_for_the_newest():
    assert cuda_arch.select_arch_list({}, [], None)[0] == PORTABLE
    assert cuda_arch.select_arch_list({"TORCH_CUDA_ARCH_LIST": " "}, [], None)[0] == PORTABLE
    # an nvcc without sm_89/sm_90 (CUDA 11.7): what it cannot compile is left out, PTX moves to the newest left
    assert cuda_arch.select_arch_list({}, [], ["7.0", "7.5", "8.0", "8.6"])[0] == "7.5;8.0;8.6+PTX"
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
        cuda_arch.portable_arch_list(["5.0", "6.0"])


def test_torch_turns_the_lists_into_the_gencode_targets(monkeypatch):
    """The portable list is one torch accepts; the targets are what dfine._C.cuda_archs() reports."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", PORTABLE)
    targets = cuda_arch.gencode_targets(cpp_extension._get_cuda_arch_flags())
    assert sorted(targets) == sorted(["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"])
    # torch's own detection with a visible H200 (mocked): its capability, +PTX
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90", "sm_120"])
    assert sorted(cuda_arch.gencode_targets(cpp_extension._get_cuda_arch_flags())) == ["compute_90", "sm_90"]


def _nvcc():
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")


def test_local_nvcc_compiles_the_portable_list():
    nvcc = _nvcc()
    if not nvcc:
        if IN_CI:
            pytest.fail("CI builds the CUDA sources, so nvcc must be found")
        pytest.skip("no nvcc here")
    archs = cuda_arch.nvcc_archs(nvcc)
    assert archs is not None and {"7.5", "8.0", "8.6", "8.9", "9.0"} <= set(archs), archs
    assert cuda_arch.nvcc_archs("/nonexistent/nvcc") is None


def test_gencode_parsing():
    flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=compute_90",
             "-gencode", "arch=compute_90a,code=[sm_90a,compute_90a]"]
    assert cuda_arch.gencode_targets(flags) == ["sm_80", "compute_90", "sm_90a", "compute_90a"]
    assert cuda_arch.parse_targets("sm_80,compute_80") == ["sm_80", "compute_80"]
    assert cuda_arch.parse_targets("") == []


# ------------------------------------------------------------------------------------------------
# run time: does a binary run on a GPU


@pytest.mark.parametrize("targets, capability, runs", [
    (["sm_80"], (8, 0), True),
    (["sm_80"], (8, 6), True),     # a cubin runs on later minors of its major
    (["sm_80"], (7, 5), False),
    (["sm_80"], (9, 0), False),    # the original bug: an 8.0-only build on an H100/H200
    (["sm_86"], (8, 0), False),
    (["sm_80", "compute_80"], (9, 0), True),   # PTX is JIT-compiled for newer GPUs
    (["compute_90"], (8, 9), False),           # ... never for older ones
    (["sm_90a"], (9, 0), True),
    (["sm_90a"], (10, 0), False),  # arch-specific: that GPU only
    (["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"], (7, 5), True),
    (["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"], (12, 0), True),
    ([], (8, 0), False),
])
def test_runs_on(targets, capability, runs):
    assert cuda_arch.runs_on(targets, capability) is runs


class FakeExtension:
    def __init__(self, archs="sm_80", cuda=True):
        self.archs, self.cuda = archs, cuda

    def with_cuda(self):
        return self.cuda

    def cuda_archs(self):
        return self.archs


@pytest.fixture
def gpu(monkeypatch):
    """A mocked H200 (compute capability 9.0) and a fresh dispatch state; returns a setter for the extension."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_backend, "_cuda_arch_problems", {})
    monkeypatch.setattr(_backend, "_resolved_cpp", set())
    monkeypatch.setattr(_backend, "_warned_arch", False)
    monkeypatch.setattr(_backend, "_warned_fallback", False)
    monkeypatch.setattr(_backend, "_ext_tried", True)

    def use(ext, triton=True):
        monkeypatch.setattr(_backend, "_ext", ext)
        monkeypatch.setattr(_backend, "triton_available", lambda: triton)

    return use


CUDA0 = torch.device("cuda", 0)


def test_auto_falls_back_to_triton_with_one_warning_naming_the_fix(gpu):
    gpu(FakeExtension("sm_80"))
    with pytest.warns(RuntimeWarning) as caught:
        assert _backend.resolve_backend("auto", CUDA0, "ms_deform_attn") == "triton"
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace" in text
    assert "sm_80" in text and "NVIDIA H200" in text and "Triton" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, for any op
        assert _backend.resolve_backend("auto", CUDA0, "fdr_decode") == "triton"
        assert _backend.resolve_backend("auto", torch.device("cuda"), "fgl_loss") == "triton"


def test_auto_falls_back_to_the_reference_without_triton(gpu):
    gpu(FakeExtension("sm_80"), triton=False)
    with pytest.warns(RuntimeWarning, match="reference ops on this GPU"):
        assert _backend.resolve_backend("auto", CUDA0, "ms_deform_attn") == "reference"


def test_explicit_cpp_raises_the_same_fix(gpu):
    gpu(FakeExtension("sm_75,sm_80,sm_86"))
    with pytest.raises(RuntimeError, match=r"ddf_loss: backend='cpp': .*TORCH_CUDA_ARCH_LIST=9\.0 python setup\.py"):
        _backend.resolve_backend("cpp", CUDA0, "ddf_loss")


def test_a_matching_binary_runs_the_compiled_kernels(gpu):
    gpu(FakeExtension("sm_90,compute_90"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve_backend("auto", CUDA0, "ms_deform_attn") == "cpp"
        assert _backend.resolve_backend("cpp", CUDA0, "ms_deform_attn") == "cpp"
    assert _backend.resolved_to_cpp("auto", CUDA0)
    gpu(FakeExtension("sm_80,compute_80"))  # PTX of an older arch: JIT-compiled on the H200
    _backend._cuda_arch_problems.clear()
    _backend._resolved_cpp.clear()
    assert _backend.resolve_backend("auto", CUDA0, "ms_deform_attn") == "cpp"


def test_the_check_is_per_gpu(gpu, monkeypatch):
    """Two GPUs of different architectures: the binary (sm_80) runs on the A100, not on the H200."""
    gpu(FakeExtension("sm_80"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0) if i == 1 else (9, 0))
    assert _backend.resolve_backend("auto", torch.device("cuda", 1), "ms_deform_attn") == "cpp"
    with pytest.warns(RuntimeWarning, match="compute capability 9.0"):
        assert _backend.resolve_backend("auto", CUDA0, "ms_deform_attn") == "triton"


def test_a_binary_that_cannot_tell_its_archs_is_trusted(gpu):
    """dfine._C from before cuda_archs() existed: no check (it behaves as before)."""

    class OldExtension:
        def with_cuda(self):
            return True

    gpu(OldExtension())
    assert _backend.extension_cuda_targets() is None
    assert _backend.resolve_backend("auto", CUDA0, "ms_deform_attn") == "cpp"


def test_the_built_extension_reports_its_targets():
    """The loaded binary answers cuda_archs(): its -gencode targets with CUDA, "" without."""
    ext = _backend.load_extension()
    if ext is None or not hasattr(ext, "cuda_archs"):
        if IN_CI:
            pytest.fail("CI builds dfine._C with cuda_archs()")
        pytest.skip("dfine._C is not built, or built before cuda_archs() existed")
    targets = cuda_arch.parse_targets(ext.cuda_archs())
    if ext.with_cuda():
        assert targets and all(t.startswith(("sm_", "compute_")) for t in targets), targets
        if IN_CI and os.environ.get("TORCH_CUDA_ARCH_LIST") == "8.0":
            assert targets == ["sm_80"]
    else:
        assert targets == []


def test_setup_py_without_a_gpu_compiles_the_portable_list():
    """setup.py itself (its metadata only: nothing is built): no GPU, TORCH_CUDA_ARCH_LIST unset."""
    import subprocess
    import sys
    from pathlib import Path

    nvcc = _nvcc()
    if not nvcc or torch.version.cuda is None:
        if IN_CI:
            pytest.fail("CI builds the CUDA sources, so nvcc and a CUDA torch must be there")
        pytest.skip("no nvcc or no CUDA torch here")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    env.update(DFINE_WITH_CUDA="1", CUDA_VISIBLE_DEVICES="")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("dfine: building CUDA kernels for sm_75,sm_80,sm_86,sm_89,compute_90,sm_90 (no GPU is visible"
            in done.stdout), done.stdout[-2000:]
