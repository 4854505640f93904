"""Triton kernels. Each module holds private ``@triton.jit`` kernels beside the
launcher that allocates, computes the grid and passes explicit strides."""
