"""Small C kernels for the CPU path, compiled on first use with the machine's C compiler.

There is no maintained CPU paged-attention library for current torch (IPEX stopped at 2.8), and
torch's own ops cannot read a paged cache without first gathering it. Each kernel here has a
plain-torch fallback, used when no compiler is found.
"""
