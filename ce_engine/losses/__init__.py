"""Built-in losses; importing this package registers them."""

from ce_engine.losses.cross_entropy import cross_entropy

__all__ = ["cross_entropy"]
