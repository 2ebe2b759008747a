"""Built-in losses; importing this package registers them."""

from ce_engine.losses.binary_cross_entropy import binary_cross_entropy
from ce_engine.losses.cross_entropy import cross_entropy
from ce_engine.losses.focal import focal
from ce_engine.losses.kl_divergence import kl_divergence
from ce_engine.losses.linear_cross_entropy import linear_cross_entropy
from ce_engine.losses.multiclass_hinge import multiclass_hinge

__all__ = [
    "binary_cross_entropy",
    "cross_entropy",
    "focal",
    "kl_divergence",
    "linear_cross_entropy",
    "multiclass_hinge",
]
