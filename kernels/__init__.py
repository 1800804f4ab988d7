"""Triton kernels, one per file: kernel, launcher, autograd Function and ``<op>_reference``."""
