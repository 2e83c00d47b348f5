"""Is the sampler to be believed: health verdicts, step-size bias, calibration, ground
truths, head roles.
"""
