"""refteacher.kernels: fused Triton kernels, each with a plain-PyTorch reference twin.

A dispatcher (``refteacher.kernels.dispatch``) picks Triton for CUDA tensors and a chunked
PyTorch path on CPU; ``REFTEACHER_KERNEL_BACKEND`` forces one.
"""
