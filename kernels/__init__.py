"""Triton kernels of the fused ops (one file per op). Entry points are wrapped as torch.library
custom ops in ``dfine/ops/``; call them through ``dfine.ops.<op>(..., backend="triton")``."""
