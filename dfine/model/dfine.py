"""The whole detector: backbone -> hybrid encoder -> D-FINE decoder."""

from __future__ import annotations

import torch.nn as nn

from dfine.ops._backend import symbolic_shapes


class DFINE(nn.Module):
    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images, targets=None, return_layers=False):
        """``return_layers=True`` (eval): the output also holds "layers", every decoder layer's accumulated
        FDR corner logits, boxes and reference points (see DFINETransformer.forward)."""
        if not symbolic_shapes() and (images.dim() != 4 or images.shape[1] != 3):
            raise ValueError(f"DFINE: images must be [B, 3, H, W], got {tuple(images.shape)}")
        feats = self.encoder(self.backbone(images))
        if return_layers:
            return self.decoder(feats, targets, return_layers=True)
        return self.decoder(feats, targets)

    def deploy(self):
        """Fold BN into convs, merge RepVGG branches, drop heads unused at inference; eval mode."""
        self.eval()
        for m in list(self.modules()):
            if hasattr(m, "convert_to_deploy"):
                m.convert_to_deploy()
        return self
