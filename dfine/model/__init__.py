"""D-FINE model modules, their builders and checkpoint loading (layer `model`: imports ops and config only)."""

from dfine.model.build import build_model, build_postprocessor, set_backend
from dfine.model.checkpoint import LoadReport, load_checkpoint
from dfine.model.decoder import DFINETransformer
from dfine.model.dfine import DFINE
from dfine.model.hgnetv2 import HGNetv2
from dfine.model.hybrid_encoder import HybridEncoder
from dfine.model.postprocessor import DFINEPostProcessor

__all__ = ["DFINE", "DFINETransformer", "DFINEPostProcessor", "HGNetv2", "HybridEncoder", "LoadReport",
           "build_model", "build_postprocessor", "load_checkpoint", "set_backend"]
