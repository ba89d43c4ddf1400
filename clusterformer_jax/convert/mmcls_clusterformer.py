"""Released ClusterFormer checkpoints (mmcls ``ImageClassifier`` state_dict) <-> Flax params.

Key layout of the released code (upstream ClusterFormer/ClusterFormer, mmcls):
  backbone.patch_embed.proj.{weight,bias}                      -> backbone/patch_embed
  backbone.network.{2i}.{j}.{norm1,norm2,layer_scale_*,...}     -> backbone/stage_i_block_j/...
  backbone.network.{2i}.{j}.token_mixer.conv_c.*                -> .../token_mixer/em/conv_c (shared by all T)
  backbone.network.{2i-1}.proj.{weight,bias}                    -> backbone/downsample_i
  backbone.norm{2i}.{weight,bias}                               -> backbone/norm_i
  head.fc.{weight,bias}                                         -> head
1x1 convolutions become Dense kernels (in, out); k x k convolutions become (kh, kw, in, out).

Usage:
  python -m clusterformer_jax.convert.mmcls_clusterformer --checkpoint cluster_tiny.pth \
      --model clusterformer_tiny_official --output converted_tiny.safetensors
``.pth`` needs PyTorch installed; ``.safetensors`` never does. The output is a safetensors file with
Flax-path keys ('backbone/stage_0_block_0/...') that ``config.init_from`` reads.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clusterformer_jax.convert.common import Params, abstract_variables, leaf_name, read_checkpoint, run_converter_cli


def torch_key(path: Tuple[str, ...]) -> str:
    """Flax param path -> the released state_dict key."""
    *mods, leaf = path
    leaf = leaf_name(leaf)
    if mods[0] == "head":
        return f"head.fc.{leaf}"
    name = mods[1]
    if name == "patch_embed":
        return f"backbone.patch_embed.proj.{leaf}"
    if m := re.fullmatch(r"downsample_(\d)", name):
        return f"backbone.network.{2 * int(m[1]) - 1}.proj.{leaf}"
    if m := re.fullmatch(r"norm_(\d)", name):
        return f"backbone.norm{2 * int(m[1])}.{leaf}"
    m = re.fullmatch(r"stage_(\d)_block_(\d+)", name)
    if not m:
        raise ValueError(f"no state_dict key for Flax parameter {'/'.join(path)}")
    rest = [p for p in mods[2:] if p != "em"]  # conv_c lives in the EM scan's shared params
    return ".".join([f"backbone.network.{2 * int(m[1])}.{m[2]}", *rest, leaf])


def _to_torch(path: Tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if value.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
        return value.transpose(3, 2, 0, 1)
    if path[0] == "head":  # Linear
        return value.T
    return value.T[:, :, None, None]  # 1x1 conv


def _from_torch(path: Tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if value.ndim == 4 and value.shape[2:] != (1, 1):
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 4:
        return value[:, :, 0, 0].T
    return value.T


def flax_to_state_dict(params: Params) -> Dict[str, np.ndarray]:
    """Flax params of a ``*_official`` preset -> the released state_dict (numpy arrays)."""
    flat = traverse_util.flatten_dict(params)
    return {torch_key(path): _to_torch(path, np.asarray(value)) for path, value in flat.items()}


def state_dict_to_flax(state_dict: Mapping[str, np.ndarray], abstract_params: Params) -> Params:
    """Fills the tree of ``abstract_params`` (e.g. from ``jax.eval_shape(model.init, ...)``) from a state_dict.

    Missing keys, unexpected keys (other than ``num_batches_tracked``) and shape mismatches raise a
    ValueError naming the first offending key.
    """
    flat = traverse_util.flatten_dict(abstract_params)
    expected = {torch_key(path): path for path in flat}
    unexpected = sorted(k for k in state_dict if k not in expected and not k.endswith("num_batches_tracked"))
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} keys the model lacks, first {unexpected[0]!r}; "
            "is the model preset right (tiny vs small, official vs paper)?"
        )
    missing = sorted(k for k in expected if k not in state_dict)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} keys the model needs, first {missing[0]!r}")
    out = {}
    for key, path in expected.items():
        value = _from_torch(path, np.asarray(state_dict[key], np.float32))
        if value.shape != tuple(flat[path].shape):
            raise ValueError(
                f"checkpoint key {key!r} has shape {tuple(state_dict[key].shape)}, the model expects the "
                f"Flax shape {tuple(flat[path].shape)} at {'/'.join(path)}"
            )
        out[path] = jnp.asarray(value, flat[path].dtype)
    return traverse_util.unflatten_dict(out)


def convert(checkpoint: str, model_name: str, image_size: int = 224, **overrides: Any) -> Params:
    """Converts a released checkpoint into params of registry preset ``model_name``."""
    abstract = abstract_variables(model_name, image_size, **overrides)["params"]
    return state_dict_to_flax(read_checkpoint(checkpoint), abstract)


def main(argv: Optional[list[str]] = None) -> None:
    run_converter_cli(__doc__.split("\n")[0], convert, "clusterformer_tiny_official", argv)


if __name__ == "__main__":
    main()
