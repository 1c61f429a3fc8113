"""Build the dfine._C extension: C++ CPU kernels always, CUDA kernels when possible.

    python setup.py build_ext --inplace          # or: pip install --no-build-isolation -e .

Environment:
    DFINE_WITH_CUDA=1   compile the CUDA sources; fail loudly if torch has no CUDA or nvcc is missing
    DFINE_WITH_CUDA=0   never compile them
    (unset)             compile them when torch was built with CUDA and nvcc is found
    TORCH_CUDA_ARCH_LIST  GPU architectures to compile for. Unset: those of the visible GPUs (torch's detection),
                        or with no GPU visible "7.5;8.0;8.6;8.9;9.0+PTX" (dfine/ops/cuda_arch.py)
    DFINE_MARCH_NATIVE=1  add -march=native to the C++ flags (off by default: the binary stays portable)
    MAX_JOBS            parallel compile jobs for ninja
"""

import glob
import importlib.util
import os
import shutil

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _cuda_arch_module():
    """dfine/ops/cuda_arch.py, loaded by path: importing the package would need the extension being built."""
    spec = importlib.util.spec_from_file_location("dfine_cuda_arch", os.path.join(ROOT, "dfine", "ops", "cuda_arch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_arch_targets(cuda_home: str):
    """Settle TORCH_CUDA_ARCH_LIST (see the module docstring); the targets nvcc will compile ("sm_80", ...)."""
    arch = _cuda_arch_module()
    visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    chosen, why = arch.select_arch_list(os.environ, visible, arch.nvcc_archs(os.path.join(cuda_home, "bin", "nvcc")))
    if chosen is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = chosen
    flags = cpp_extension._get_cuda_arch_flags()  # what BuildExtension passes to nvcc
    targets = arch.gencode_targets(flags)
    print(f"dfine: building CUDA kernels for {','.join(targets)} ({why})")
    return targets


def want_cuda() -> bool:
    flag = os.environ.get("DFINE_WITH_CUDA", "").strip().lower()
    has_torch_cuda = torch.version.cuda is not None
    cuda_home = _cuda_home()
    if flag in ("1", "true", "yes", "on"):
        if not has_torch_cuda:
            raise RuntimeError("DFINE_WITH_CUDA=1 but this torch was built without CUDA (torch.version.cuda is None)")
        if cuda_home is None:
            raise RuntimeError("DFINE_WITH_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return has_torch_cuda and cuda_home is not None


def extensions():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if os.environ.get("DFINE_MARCH_NATIVE", "0") == "1":
        cxx_flags.append("-march=native")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda():
        cuda_home = _cuda_home()
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = cuda_home  # the module guessed it at import time
        targets = cuda_arch_targets(cuda_home)
        return [
            cpp_extension.CUDAExtension(
                "dfine._C",
                cpp_sources + cuda_sources,
                include_dirs=include_dirs,
                # the targets reach dfine._C.cuda_archs() (letters, digits, _ and , only: no shell quoting)
                define_macros=[("DFINE_WITH_CUDA", "1"), ("DFINE_CUDA_ARCHS", ",".join(targets))],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    print("dfine: building the C++ CPU kernels only (no CUDA)")
    return [
        cpp_extension.CppExtension(
            "dfine._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="dfine",
    version="0.1.0",
    description="D-FINE real-time detector with fused deformable-attention, FDR and GO-LSD kernels",
    # the Triton kernels install as dfine.kernels (dfine/kernels links to the top-level kernels/ folder):
    # nothing generic lands in site-packages
    packages=find_packages(include=["dfine", "dfine.*"]),
    package_data={"dfine": ["data/README.md"]},
    python_requires=">=3.10",
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
