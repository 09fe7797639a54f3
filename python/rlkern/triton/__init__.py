"""Triton kernels for CUDA tensors (and for CPU tensors under ``TRITON_INTERPRET=1``): the
losses, the log-probs, batch whitening, and the return scans where the CUDA C++ ones cannot run.

Each kernel module lists its ahead-of-time compile specs in ``AOT_SPECS`` so that the
test suite can compile every kernel for sm_80 and sm_90 without a GPU and fail on a
compile error or a register spill (see ``rlkern.triton.aot``).
"""

KERNEL_MODULES = ("losses", "logprobs", "returns", "whiten")
