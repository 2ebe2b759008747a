"""Repository scripts: deployment helpers, README generators, smoke checks."""
