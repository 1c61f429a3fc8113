"""The D-FINE training criterion and its Hungarian matcher (layer `loss`: imports ops and model only)."""

from dfine.loss.criterion import DFINECriterion, build_criterion
from dfine.loss.matcher import HungarianMatcher

__all__ = ["DFINECriterion", "HungarianMatcher", "build_criterion"]
