"""The built-in pretrained BLT and its entropy model, shipped inside the package.

``load_model("builtin")`` / ``load_model("builtin-entropy")`` read them from this folder; the recipe that
trains them is :mod:`torchblt.builtin.recipe` (``blt builtin train --out DIR``).
"""
