"""Triton kernels of lowmembp_convert: ``@triton.jit`` code only, no torch.nn, no model knowledge.

Installed as ``lowmembp_convert.kernels``. Launchers live in ``lowmembp_convert.ops``; import this
package lazily (only when the Triton path is taken) so CPU-only installs never import Triton.
"""
