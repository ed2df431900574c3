"""calm_kernels: Triton kernels for calm's hot path, each beside the PyTorch reference of the same function.

Importing this package never launches a kernel and never imports triton; launchers import it lazily.
"""
