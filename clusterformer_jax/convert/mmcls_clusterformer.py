"""Released ClusterFormer checkpoints (mmcls ``ImageClassifier`` state_dict) <-> Flax params.

Key layout of the released code (seed_systems.md §2.6):
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

import argparse
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Params = Dict[str, Any]
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_key(path: Tuple[str, ...]) -> str:
    """Flax param path -> the released state_dict key."""
    *mods, leaf = path
    leaf = _LEAF.get(leaf, leaf)
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


def read_checkpoint(path: str, entry: Optional[str] = None) -> Dict[str, np.ndarray]:
    """A flat state_dict from ``.safetensors``, or from a PyTorch file (needs torch).

    PyTorch files may hold the state_dict itself or a dict with it under ``entry`` (default: 'state_dict',
    then 'model', then the file itself).
    """
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    if not path.endswith((".pth", ".pt", ".bin", ".tar")):
        raise ValueError(f"unsupported checkpoint file {path}: expected .pth, .pth.tar or .safetensors")
    try:
        import torch
    except ImportError as err:
        raise ValueError(f"reading {path} needs PyTorch (pip install torch); or convert it to .safetensors") from err
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if entry is not None:
        if entry not in ckpt:
            raise ValueError(f"checkpoint {path} has no entry {entry!r}; it has {sorted(ckpt)}")
        state = ckpt[entry]
    else:
        state = ckpt.get("state_dict", ckpt.get("model", ckpt))
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def save_flax_params(params: Params, path: str) -> None:
    from safetensors.numpy import save_file

    flat = traverse_util.flatten_dict(params, sep="/")
    save_file({k: np.asarray(v) for k, v in flat.items()}, path)


def load_flax_params(path: str) -> Params:
    from safetensors.numpy import load_file

    return traverse_util.unflatten_dict(load_file(path), sep="/")


def convert(checkpoint: str, model_name: str, image_size: int = 224, **overrides) -> Params:
    """Converts a released checkpoint into params of registry preset ``model_name``."""
    from clusterformer_jax.models.registry import create_model

    model = create_model(model_name, **overrides)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, images))["params"]
    return state_dict_to_flax(read_checkpoint(checkpoint), abstract)


def run_converter_cli(
    description: str,
    convert_fn: Callable[..., Params],
    default_model: str,
    argv: Optional[list[str]] = None,
    with_ema: bool = False,
) -> None:
    """The shared ``--checkpoint/--model/--output`` command line of every converter in this package."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", required=True, help=".pth (needs torch) or .safetensors")
    parser.add_argument("--model", default=default_model, help="registry preset")
    parser.add_argument("--output", required=True, help="output .safetensors with '/'-joined Flax keys")
    if with_ema:
        parser.add_argument("--ema", action="store_true", help="take the checkpoint's state_dict_ema")
    args = parser.parse_args(argv)
    try:
        tree = convert_fn(args.checkpoint, args.model, **({"ema": args.ema} if with_ema else {}))
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    save_flax_params(tree, args.output)
    params = tree.get("params", tree)  # variables with BatchNorm statistics, or plain params
    count = sum(np.size(x) for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.output}: {count:,} parameters for {args.model}")


def main(argv: Optional[list[str]] = None) -> None:
    run_converter_cli(__doc__.split("\n")[0], convert, "clusterformer_tiny_official", argv)


if __name__ == "__main__":
    main()
