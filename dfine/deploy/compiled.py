"""torch.compile for inference: the deployed model in one graph, the fused custom ops inside it.

The C++ ops (``torch.ops.dfine.ms_deform_attn_*``, ``torch.ops.dfine.fdr_decode_forward``) are
``torch.library`` custom ops with fake kernels, so Dynamo puts them in the graph as opaque calls and
Inductor compiles everything around them. ``fullgraph=True`` makes any graph break an error instead of
a silent fallback. ``dynamic=False``: one graph per input size (``predict`` always feeds the model size).

Per-size caches: the encoder's position embeddings and the decoder's anchors are computed once per
feature-map size and kept in dicts. A graph traced while a size's entry is missing fills it, and then its
guard (``key not in cache``) fails on the next call: a second compile of the same size. So the first call
of each new input size runs the eager model once to fill the caches, and the graph is traced reading them.
"""

from __future__ import annotations

import torch

#: compile choices for ``compile_model(mode=...)``; None is torch.compile's default
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledModel(torch.nn.Module):
    """The compiled model, with the eager warm-up of the per-size caches at each new input size."""

    def __init__(self, model: torch.nn.Module, compiled):
        super().__init__()
        self.model = model
        self.compiled = compiled
        self._sizes = set()

    def forward(self, images, *args, **kwargs):
        key = (tuple(images.shape), images.dtype, str(images.device))
        if key not in self._sizes:
            with torch.no_grad():
                self.model(images)  # fills the per-size caches before the graph for this size is traced
            self._sizes.add(key)
        return self.compiled(images, *args, **kwargs)


def compile_model(model: torch.nn.Module, mode: str | None = None, backend="inductor",
                  fullgraph: bool = True, dynamic: bool = False) -> CompiledModel:
    """``torch.compile`` of an eval-mode (preferably deployed) model; call it under ``torch.no_grad()``.
    Compilation happens on the first call (tens of seconds on CPU) and once more for each new input size."""
    if model.training:
        raise ValueError("compile_model: put the model in eval mode first (model.deploy() or model.eval())")
    compiled = torch.compile(model, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return CompiledModel(model, compiled)


def graph_breaks(model: torch.nn.Module, *inputs):
    """``torch._dynamo.explain`` of one call: (graph_count, graph_break_count, break reasons, FX graphs)."""
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(*inputs)
    reasons = [b.reason for b in explained.break_reasons]
    return explained.graph_count, explained.graph_break_count, reasons, explained.graphs


def custom_ops_in(graphs) -> set:
    """Names of the ``torch.ops.dfine`` calls in FX graphs (to check the fused ops are inside the graph)."""
    names = set()
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("dfine."):
                names.add(str(node.target).split(".")[1])
    return names
