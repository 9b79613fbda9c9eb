"""Curvature analysis: Lanczos extremes, trace and spectral density estimates, the verdict."""
