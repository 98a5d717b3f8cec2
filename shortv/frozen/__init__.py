"""Frozen decoder layers: ``reference`` (run then restore, any architecture) and compute-skipping fast paths."""
