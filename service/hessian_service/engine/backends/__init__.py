"""Curvature backends: the one selector (native or autograd, per call) and the native extension."""
