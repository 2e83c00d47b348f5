"""The model side: components, the localized tempered posterior, forward splits and
architecture adapters.
"""
