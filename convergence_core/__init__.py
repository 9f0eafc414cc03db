"""Convergence Explorer backend: stimulus-level convergence of neural representations.

The public API is re-exported here; see docs/ARCHITECTURE.md for the module map.
"""
