"""Official GroupMixFormer checkpoints (``{'model': state_dict}``) <-> Flax variables (params + batch_stats).

Key layout (upstream AILab-CVC/GroupMixFormer) and where each key lives in the Flax tree of ``GroupMixFormer``:
  conv_stem.{proj1,norm1,proj2,norm2}.*                    -> backbone/conv_stem/...
  patch_embed_layers.{i}.{proj.conv1,proj.pointwise_conv,norm}.*  -> backbone/patch_embed_{i}/...
  groupmixformer_backbone.{i}.gma_stage.{j}.<rest>         -> backbone/stage_{i}_block_{j}/<rest>
      (``att.crpe.conv_list.{n}`` is ``att/crpe/conv_list_{n}``; every other name is the same)
  norm4.*, head.*                                          -> norm4, head
BatchNorm ``weight``/``bias`` go to params (``scale``/``bias``), ``running_mean``/``running_var`` to
batch_stats (``mean``/``var``); ``num_batches_tracked`` is dropped on import. Conv weights (O, I/g, kh, kw)
become kernels (kh, kw, I/g, O); Linear weights (O, I) become (I, O).

Usage:
  python -m clusterformer_jax.convert.groupmixformer --checkpoint groupmixformer_small.pth \
      --model gmf_small --output gmf_small.safetensors
``.pth`` needs PyTorch; ``.safetensors`` (a flat state_dict) never does. The output holds the Flax variables
with '/'-joined keys ('params/backbone/conv_stem/proj1/kernel', 'batch_stats/norm4/mean', ...).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clusterformer_jax.convert.common import abstract_variables, read_checkpoint, run_converter_cli

Variables = Dict[str, Any]
_LEAVES = {
    "params": {"kernel": "weight", "scale": "weight", "bias": "bias"},
    "batch_stats": {"mean": "running_mean", "var": "running_var"},
}
COLLECTIONS = tuple(_LEAVES)

__all__ = [
    "torch_key",
    "flax_to_state_dict",
    "state_dict_to_flax",
    "convert",
    "main",
]


def torch_key(collection: str, path: Tuple[str, ...]) -> str:
    """(collection, Flax path) of a ``GroupMixFormer`` variable -> its key in the official state_dict."""
    *mods, leaf = path
    if collection not in _LEAVES or leaf not in _LEAVES[collection]:
        raise ValueError(f"no state_dict key for Flax variable {collection}/{'/'.join(path)}")
    leaf = _LEAVES[collection][leaf]
    if mods[0] != "backbone":
        return ".".join([*mods, leaf])
    name, rest = mods[1], list(mods[2:])
    rest = [re.sub(r"^conv_list_(\d+)$", r"conv_list.\1", part) for part in rest]
    if name == "conv_stem":
        return ".".join(["conv_stem", *rest, leaf])
    if m := re.fullmatch(r"patch_embed_(\d+)", name):
        return ".".join([f"patch_embed_layers.{m[1]}", *rest, leaf])
    if m := re.fullmatch(r"stage_(\d+)_block_(\d+)", name):
        return ".".join([f"groupmixformer_backbone.{m[1]}.gma_stage.{m[2]}", *rest, leaf])
    raise ValueError(f"no state_dict key for Flax variable {collection}/{'/'.join(path)}")


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf != "kernel":
        return value
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T


def _from_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf != "kernel":
        return value
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T


def _flat(variables: Mapping[str, Any]) -> Dict[Tuple[str, Tuple[str, ...]], Any]:
    out = {}
    for collection in COLLECTIONS:
        for path, value in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
            out[(collection, path)] = value
    return out


def flax_to_state_dict(variables: Mapping[str, Any], num_batches_tracked: bool = True) -> Dict[str, np.ndarray]:
    """Flax variables ({'params', 'batch_stats'}) -> the official state_dict as numpy arrays.

    With ``num_batches_tracked`` every BatchNorm also gets a zero int64 ``num_batches_tracked`` entry, so
    the result loads into the PyTorch model with ``strict=True``.
    """
    out = {}
    for (collection, path), value in _flat(variables).items():
        key = torch_key(collection, path)
        out[key] = _to_torch(path[-1], np.asarray(value, np.float32))
        if num_batches_tracked and collection == "batch_stats" and path[-1] == "mean":
            out[key[: -len("running_mean")] + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


def state_dict_to_flax(state_dict: Mapping[str, Any], abstract: Mapping[str, Any]) -> Variables:
    """Fills the tree of ``abstract`` (``jax.eval_shape`` of ``model.init``) from a state_dict.

    Returns {'params': ..., 'batch_stats': ...}. The first missing key, unexpected key (other than
    ``num_batches_tracked``) or mis-shaped key raises a one-line ValueError naming it.
    """
    flat = _flat(abstract)
    expected = {torch_key(*where): where for where in flat}
    unexpected = sorted(k for k in state_dict if k not in expected and not k.endswith("num_batches_tracked"))
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} keys the model lacks, first {unexpected[0]!r}; "
            "is the model preset right (miny/tiny/small/base/large)?"
        )
    missing = sorted(k for k in expected if k not in state_dict)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} keys the model needs, first {missing[0]!r}")
    out: Dict[str, Dict[Tuple[str, ...], Any]] = {c: {} for c in COLLECTIONS}
    for key, (collection, path) in sorted(expected.items()):
        target = flat[(collection, path)]
        value = _from_torch(path[-1], np.asarray(state_dict[key], np.float32))
        if value.shape != tuple(target.shape):
            raise ValueError(
                f"checkpoint key {key!r} has shape {tuple(np.shape(state_dict[key]))}, the model expects the "
                f"Flax shape {tuple(target.shape)} at {collection}/{'/'.join(path)}"
            )
        out[collection][path] = jnp.asarray(value, target.dtype)
    return {c: traverse_util.unflatten_dict(leaves) for c, leaves in out.items() if leaves}


def convert(checkpoint: str, model_name: str, image_size: int = 224, **overrides: Any) -> Variables:
    """Converts an official checkpoint into the variables of registry preset ``model_name``."""
    return state_dict_to_flax(read_checkpoint(checkpoint), abstract_variables(model_name, image_size, **overrides))


def main(argv: Optional[list[str]] = None) -> None:
    run_converter_cli(__doc__.split("\n")[0], convert, "gmf_small", argv)


if __name__ == "__main__":
    main()
