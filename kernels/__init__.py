"""Triton kernels of the fused ops, one file per op (installed and imported as ``dfine.kernels``). Each file holds
the kernels, their launchers, the torch.library custom op with its fake kernel and its autograd; call them through
``dfine.ops.<op>(..., backend="triton")``."""
