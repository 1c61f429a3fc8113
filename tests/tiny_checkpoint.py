"""A tiny D-FINE-N checkpoint (320 px, 50 queries) that behaves less degenerately than a fresh random init:
the zero-initialised heads are randomised (the FDR edge distributions are not uniform) and the BatchNorm
statistics are set from a batch of random images (activations normalised as in a trained network; without
this the features of all positions are nearly equal and the query scores nearly tie, so that the top-k
query selection could flip on rounding differences, e.g. between eager and compiled runs)."""

import torch

import dfine
from tests.model_helpers import config_path


def write_tiny_checkpoint(root, seed=0):
    """Writes ``root/tiny.yml`` and ``root/tiny.pth``; returns their paths."""
    cfg_file = root / "tiny.yml"
    cfg_file.write_text(
        f"__include__: ['{config_path('n')}']\n"
        "eval_spatial_size: [320, 320]\n"
        "DFINETransformer:\n  num_queries: 50\n"
        "DFINEPostProcessor:\n  num_top_queries: 20\n"
    )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = dfine.build_model(dfine.load_config(str(cfg_file)), backend="reference")
    dec = model.decoder
    with torch.no_grad():
        def randomise(linear, std, bias=0.0):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * std)
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=gen) * std + bias)

        randomise(dec.enc_score_head, 0.3)
        randomise(dec.enc_bbox_head.layers[-1], 0.05)
        randomise(dec.pre_bbox_head.layers[-1], 0.05)
        for head in dec.dec_bbox_head:
            randomise(head.layers[-1], 0.1)
        for head in dec.dec_score_head:
            randomise(head, 0.05, bias=-1.0)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: the statistics of exactly this batch
        model.train()
        model(torch.rand(4, 3, 320, 320, generator=gen))
        for bn in bns:
            bn.momentum = 0.1
    model.eval()
    torch.save({"ema": {"module": model.state_dict()}}, root / "tiny.pth")
    return cfg_file, root / "tiny.pth"
