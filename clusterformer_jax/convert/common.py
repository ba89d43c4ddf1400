"""What every checkpoint converter shares: reading PyTorch state_dicts, layout changes, key matching, the
Flax-path safetensors files the converters write and ``config.init_from`` reads, and the command line.

A converter module only supplies its key mapping (Flax path -> state_dict key and layout kind) and a
``convert(checkpoint, model_name, ...)`` function; models are built through ``models.registry.create_model``.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
from flax import traverse_util

Params = Dict[str, Any]
Path = Tuple[str, ...]
KeyFn = Callable[[Path], Tuple[str, str]]  # Flax path -> (state_dict key, layout kind)
COLLECTIONS = ("params", "batch_stats")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


# ---------------------------------------------------------------------------------------------------
# Files.


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


def save_flax_params(tree: Params, path: str) -> None:
    """Writes a params tree (or {'params', 'batch_stats'} variables) as safetensors with '/'-joined keys."""
    from safetensors.numpy import save_file

    flat = traverse_util.flatten_dict(tree, sep="/")
    save_file({k: np.asarray(v) for k, v in flat.items()}, path)


def load_flax_params(path: str) -> Params:
    """The tree ``save_flax_params`` wrote, as numpy arrays."""
    from safetensors.numpy import load_file

    return traverse_util.unflatten_dict(load_file(path), sep="/")


def load_variables(path: str) -> Dict[str, Params]:
    """Flax variables from a converted file: {'params': ...} plus 'batch_stats' when the file has them.

    Converters write either a bare params tree ('backbone/...', 'head/...') or, for models with BatchNorm,
    the variables ('params/...', 'batch_stats/...'); both come back in the second form.
    """
    tree = load_flax_params(path)
    if "params" in tree and set(tree) <= set(COLLECTIONS):
        return {k: tree[k] for k in COLLECTIONS if k in tree}
    return {"params": tree}


# ---------------------------------------------------------------------------------------------------
# Layouts and key matching.


def leaf_name(leaf: str) -> str:
    """Flax leaf name -> PyTorch parameter name ('kernel'/'scale' -> 'weight')."""
    return _LEAF.get(leaf, leaf)


def to_torch(value: np.ndarray, kind: str) -> np.ndarray:
    """Flax array -> PyTorch layout. kind: 'conv' (k x k), 'conv1x1' (Dense from a 1x1 conv), 'linear', 'plain'.

    Only kernels change: a 4-D conv kernel or a 2-D Dense kernel; biases and vectors pass through.
    """
    if kind == "conv" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if kind == "conv1x1" and value.ndim == 2:
        return value.T[:, :, None, None]
    if kind == "linear" and value.ndim == 2:
        return value.T
    return value


def from_torch(value: np.ndarray, kind: str) -> np.ndarray:
    """PyTorch layout -> Flax array (inverse of ``to_torch``; a (O, I, 1, 1) 'linear' weight is squeezed)."""
    if kind == "conv":
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    if kind in ("conv1x1", "linear"):
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        return value.T if value.ndim == 2 else value
    return value


def export_params(params: Params, key_fn: KeyFn) -> Dict[str, np.ndarray]:
    """Flax params -> a state_dict of numpy arrays in PyTorch layouts."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        key, kind = key_fn(path)
        out[key] = to_torch(np.asarray(value), kind)
    return out


def fill_params(
    state_dict: Mapping[str, Any], abstract_params: Params, key_fn: KeyFn, hint: str = "is the model preset right?"
) -> Params:
    """The tree of ``abstract_params`` filled from ``state_dict``.

    The first unexpected key (``num_batches_tracked`` is ignored), missing key or mis-shaped key raises a
    one-line ValueError naming it.
    """
    import jax.numpy as jnp

    flat = traverse_util.flatten_dict(abstract_params)
    expected = {}
    for path in flat:
        key, kind = key_fn(path)
        expected[key] = (path, kind)
    unexpected = sorted(k for k in state_dict if k not in expected and not k.endswith("num_batches_tracked"))
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} keys the model lacks, first {unexpected[0]!r}; {hint}")
    missing = sorted(k for k in expected if k not in state_dict)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} keys the model needs, first {missing[0]!r}; {hint}")
    out = {}
    for key, (path, kind) in expected.items():
        raw = np.asarray(state_dict[key], np.float32)
        value = from_torch(raw, kind)
        if value.shape != tuple(flat[path].shape):
            raise ValueError(
                f"checkpoint key {key!r} has shape {tuple(raw.shape)}, the model expects the Flax shape "
                f"{tuple(flat[path].shape)} at {'/'.join(path)}; {hint}"
            )
        out[path] = jnp.asarray(value, flat[path].dtype)
    return traverse_util.unflatten_dict(out)


def abstract_variables(model_name: str, image_size: int = 224, **overrides: Any) -> Dict[str, Params]:
    """Variable shapes of registry preset ``model_name`` (``jax.eval_shape`` of ``init``, nothing allocated)."""
    import jax
    import jax.numpy as jnp

    from clusterformer_jax.models.registry import create_model

    model = create_model(model_name, **overrides)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, images))


# ---------------------------------------------------------------------------------------------------
# Command line.


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
    count = sum(np.size(x) for x in traverse_util.flatten_dict(params).values())
    print(f"wrote {args.output}: {count:,} parameters for {args.model}")
