"""The shipped demo: an attention-only byte transformer, its corpus, its training and the
demo preset.
"""
