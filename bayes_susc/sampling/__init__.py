"""Drawing from the posterior: the vectorized driver, executors, the exact reference and
the Pyro adapter.
"""
