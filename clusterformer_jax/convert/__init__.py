"""Converters from released PyTorch checkpoints to Flax variables, one module per upstream layout.

``load_variables(path)`` is the one entry point the trainer uses: it reads a file any converter wrote.
"""

from clusterformer_jax.convert.common import load_variables

__all__ = ["load_variables"]
