"""D-FINE model modules."""

from dfine.model.decoder import DFINETransformer
from dfine.model.dfine import DFINE
from dfine.ops.fdr import distance2bbox, fdr_decode, weighting_function
from dfine.model.hgnetv2 import HGNetv2
from dfine.model.hybrid_encoder import HybridEncoder
from dfine.model.postprocessor import DFINEPostProcessor

__all__ = ["DFINE", "DFINETransformer", "DFINEPostProcessor", "HGNetv2", "HybridEncoder", "fdr_decode",
           "weighting_function", "distance2bbox"]
