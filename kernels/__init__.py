"""fastmeta.kernels: Triton kernels, one module per op, imported only by fastmeta/ops."""
