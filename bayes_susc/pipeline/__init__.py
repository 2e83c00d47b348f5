"""One run spec into one run folder: checks, sampling, saving, the response matrix and
analyses.
"""
