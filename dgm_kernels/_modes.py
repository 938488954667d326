"""Mask modes, shared by every backend. Kernels receive the integer code."""
ANNEAL = 0  # m = sigmoid(s * e)
STE = 1  # forward 1[e >= 0], backward through sigmoid's derivative (straight-through)

MODES = {"anneal": ANNEAL, "ste": STE}
