"""Which GPU architectures dfine._C is compiled for, and whether a compiled binary runs on a given GPU.

Two users: ``setup.py`` (at build time, loaded by file path so that nothing of the package is imported
before it is built) and ``dfine.ops._backend`` (at run time). So this module imports only the standard
library; the CUDA queries come in as arguments, which is also how the tests mock them.

Build time, :func:`select_arch_list`:

* ``TORCH_CUDA_ARCH_LIST`` set: used as it is (CI sets ``8.0``: one arch keeps its build short);
* unset, a GPU visible: ``None``, i.e. leave it unset, and torch's own detection
  (``torch.utils.cpp_extension._get_cuda_arch_flags``) compiles for the visible GPUs (+PTX for the newest);
* unset, no GPU visible: :data:`PORTABLE_ARCHS`, sm_75 (T4) to sm_90 (H100/H200) with PTX of the newest, so the
  binary also runs (JIT-compiled) on later GPUs; archs the local nvcc cannot compile are left out.

Run time, :func:`runs_on`: a cubin ``sm_XY`` runs on compute capability X.Z for Z >= Y (``sm_XYa`` only on X.Y
itself); PTX ``compute_XY`` is JIT-compiled for any capability >= X.Y. ``dfine._C.cuda_archs()`` returns the
targets it was compiled for (``"sm_80,compute_80"``, from the ``-gencode`` flags, see ``setup.py``).
"""

from __future__ import annotations

import re
import subprocess
from typing import Iterable, List, Optional, Sequence, Tuple

# T4, A100, A10/RTX 30xx, L4/RTX 40xx, H100/H200; PTX of 9.0 for the GPUs after them
PORTABLE_ARCHS = ("7.5", "8.0", "8.6", "8.9", "9.0")

Capability = Tuple[int, int]


def _arch_key(arch: str) -> Tuple[int, int]:
    major, minor = arch.split("+")[0].rstrip("af").split(".")
    return int(major), int(minor)


def nvcc_archs(nvcc: str = "nvcc") -> Optional[List[str]]:
    """The real architectures the local nvcc can compile, as "X.Y" (``nvcc --list-gpu-code``); None if unknown."""
    try:
        listed = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    found = []
    for m in re.finditer(r"\bsm_(\d+)(\d)\b", listed.stdout):
        found.append(f"{int(m.group(1))}.{m.group(2)}")
    return found or None


def portable_arch_list(supported: Optional[Iterable[str]] = None) -> str:
    """:data:`PORTABLE_ARCHS` (minus those ``supported`` lacks) with +PTX on the newest: "7.5;8.0;...;9.0+PTX"."""
    archs = [a for a in PORTABLE_ARCHS if supported is None or a in set(supported)]
    if not archs:
        raise RuntimeError(f"the local nvcc compiles none of the architectures {', '.join(PORTABLE_ARCHS)}; "
                           "set TORCH_CUDA_ARCH_LIST to the ones you need")
    archs = sorted(archs, key=_arch_key)
    archs[-1] += "+PTX"
    return ";".join(archs)


def select_arch_list(environ, gpu_capabilities: Sequence[Capability],
                     supported: Optional[Iterable[str]] = None) -> Tuple[Optional[str], str]:
    """``(TORCH_CUDA_ARCH_LIST to set or None to leave it unset, why)`` for a build.

    environ: the environment (a mapping); gpu_capabilities: the compute capabilities of the visible GPUs
    (``[torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]``, empty without one);
    supported: the archs the local nvcc compiles (:func:`nvcc_archs`), None if unknown.
    """
    given = (environ.get("TORCH_CUDA_ARCH_LIST") or "").strip()
    if given:
        return given, "TORCH_CUDA_ARCH_LIST is set"
    if gpu_capabilities:
        names = ", ".join(sorted({f"{major}.{minor}" for major, minor in gpu_capabilities}))
        return None, f"the visible GPUs (compute capability {names}), detected by torch"
    return portable_arch_list(supported), "no GPU is visible: a portable list, PTX for the newest"


def gencode_targets(flags: Iterable[str]) -> List[str]:
    """The ``code=`` targets of nvcc ``-gencode`` flags: ["sm_80", "compute_80"], in the flags' order."""
    targets = []
    for flag in flags:
        m = re.search(r"(?:^|[,\s])code=\[?([\w,]+)\]?", flag)
        if m:
            targets += [t for t in m.group(1).split(",") if t and t not in targets]
    return targets


def parse_targets(text: str) -> List[str]:
    """``"sm_80,compute_80"`` (what ``dfine._C.cuda_archs()`` returns) -> ["sm_80", "compute_80"]."""
    return [t for t in re.split(r"[,;\s]+", text.strip()) if t]


def _target(target: str) -> Optional[Tuple[str, int, int, str]]:
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", target)
    if not m:
        return None
    return m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)


def runs_on(targets: Iterable[str], capability: Capability) -> bool:
    """Whether a binary compiled for ``targets`` has a kernel image for a GPU of ``capability``."""
    major, minor = capability
    for target in targets:
        parsed = _target(target)
        if parsed is None:
            continue
        kind, t_major, t_minor, suffix = parsed
        if suffix == "a":  # arch-specific features: that exact GPU only
            if (t_major, t_minor) == (major, minor):
                return True
        elif kind == "sm":  # a cubin runs on later minor versions of its major
            if t_major == major and t_minor <= minor:
                return True
        elif (t_major, t_minor) <= (major, minor):  # PTX: JIT-compiled by the driver
            return True
    return False


def describe_mismatch(targets: Sequence[str], capability: Capability, gpu_name: str) -> str:
    """The error/warning text for a GPU the binary has no kernel image for; it names the fix."""
    major, minor = capability
    return (f"dfine._C was compiled for CUDA targets {','.join(targets) or '(none)'}, which have no kernel image "
            f"for this GPU ({gpu_name}, compute capability {major}.{minor}); rebuild it for this GPU: "
            f"TORCH_CUDA_ARCH_LIST={major}.{minor} python setup.py build_ext --inplace (or leave "
            f"TORCH_CUDA_ARCH_LIST unset on the GPU machine: the build then targets the GPUs it sees)")
