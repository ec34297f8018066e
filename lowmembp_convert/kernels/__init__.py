"""``lowmembp_convert.kernels``: the ``@triton.jit`` code of the repository's top-level ``kernels/`` folder.

Why two folders: the repository keeps its Triton kernels in a top-level ``kernels/`` (no torch.nn, no
model knowledge), and Hugging Face's ``kernels`` distribution, which transformers imports, has the
same top-level name. ``kernels/`` therefore has no ``__init__.py``: from the repository root (where
``python -m``, pytest and scripts put the working directory first on ``sys.path``) it is at most a
namespace portion, and an installed regular ``kernels`` package always wins over one. The kernels
are imported only under this name:

- built wheel: setuptools copies ``kernels/*.py`` into ``lowmembp_convert/kernels/`` (the
  ``package-dir`` mapping in pyproject.toml); this file is not part of the wheel, and the folder is
  a namespace subpackage of ``lowmembp_convert``;
- source checkout and editable install (setuptools' editable finder cannot map a subpackage to a
  folder without ``__init__.py``): this file is found and adds the top-level folder to ``__path__``.

Import lazily (only when the Triton path is taken) so CPU-only installs never import Triton.
"""

from pathlib import Path

_SOURCE_TREE_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
if _SOURCE_TREE_KERNELS.is_dir() and str(_SOURCE_TREE_KERNELS) not in __path__:
    __path__.append(str(_SOURCE_TREE_KERNELS))
