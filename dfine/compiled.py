"""torch.compile for inference: the deployed model in one graph, the fused custom ops inside it.

The C++ ops (``torch.ops.dfine.ms_deform_attn_*``, ``torch.ops.dfine.fdr_decode_forward``) are
``torch.library`` custom ops with fake kernels, so Dynamo puts them in the graph as opaque calls and
Inductor compiles everything around them. ``fullgraph=True`` makes any graph break an error instead of
a silent fallback. ``dynamic=False``: one graph per input size (``predict`` always feeds the model size;
other sizes recompile once each - the decoder's per-size anchors are then built inside that graph and
kept in its cache, as in eager mode).
"""

from __future__ import annotations

import torch

#: compile choices for ``compile_model(mode=...)``; None is torch.compile's default
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(model: torch.nn.Module, mode: str | None = None, backend: str = "inductor",
                  fullgraph: bool = True, dynamic: bool = False):
    """``torch.compile`` of an eval-mode (preferably deployed) model; call it under ``torch.no_grad()``.
    Compilation happens on the first call (tens of seconds on CPU) and again for each new input size."""
    if model.training:
        raise ValueError("compile_model: put the model in eval mode first (model.deploy() or model.eval())")
    return torch.compile(model, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)


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
