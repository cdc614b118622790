"""Attention math: local kernels that return the log-sum-exp, the exact merge, and the Star/ring functions."""
