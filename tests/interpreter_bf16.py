"""bf16 ``tl.dot`` under the Triton interpreter (test set-up; GPUs are unaffected).

The interpreter stores bf16 tensors as their uint16 bits (numpy has no bf16) and its ``dot``
multiplies the stored arrays, so a bf16 ``tl.dot`` multiplies bit patterns as integers. Patched
here, bf16 operands are widened to fp32 first, which is what a GPU's bf16 dot computes: each
product of two bf16 values is exact in fp32, and the sums are fp32. With it the Triton kernels
run in bf16 on the CPU, the dtype they mostly serve on a GPU.
"""
from __future__ import annotations

import numpy as np


def install() -> bool:
    """Patches the interpreter's dot once; False when this Triton has no interpreter to patch."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot"):
        return False
    if getattr(builder.create_dot, "_widens_bf16", False):
        return True
    original = builder.create_dot

    def widened(handle):
        if handle.dtype.scalar == tl.bfloat16:  # uint16 bits -> the fp32 of the same value
            bits = handle.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widened(a), widened(b), d, *args, **kwargs)

    create_dot._widens_bf16 = True
    builder.create_dot = create_dot
    return True
