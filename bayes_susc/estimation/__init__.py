"""Statistics from stored draws (no torch): convergence diagnostics, susceptibilities, the
response matrix.
"""
