"""Triton kernels and their launchers. No autograd, no module state.

Importing this package imports triton; the ops layer imports it only when the
``triton`` backend is chosen, so ``import gptkern`` works without triton.
"""
