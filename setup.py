"""Build the dfine._C extension: C++ CPU kernels always, CUDA kernels when possible.

    python setup.py build_ext --inplace          # or: pip install --no-build-isolation -e .

Environment:
    DFINE_WITH_CUDA=1   compile the CUDA sources; fail loudly if torch has no CUDA or nvcc is missing
    DFINE_WITH_CUDA=0   never compile them
    (unset)             compile them when torch was built with CUDA and nvcc is found
    TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default here: "8.0", one arch keeps builds short)
    DFINE_MARCH_NATIVE=1  add -march=native to the C++ flags (off by default: the binary stays portable)
    MAX_JOBS            parallel compile jobs for ninja
"""

import glob
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
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0")
        print(f"dfine: building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        return [
            cpp_extension.CUDAExtension(
                "dfine._C",
                cpp_sources + cuda_sources,
                include_dirs=include_dirs,
                define_macros=[("DFINE_WITH_CUDA", "1")],
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
