"""Sampler-quality studies (run as ``python -m diagnostics.<study> --out DIR [--quick]``)."""
