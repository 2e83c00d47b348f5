"""Draws on disk: the InferenceData/DataTree builder and reader, atomic writes, streamed
stores (no torch).
"""
