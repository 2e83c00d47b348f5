"""Laying out a run folder: the HTML report and plots."""
