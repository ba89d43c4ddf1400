"""Context Cluster timm checkpoints (seed_systems.md §3.3) <-> Flax params of ``context_cluster`` models.

Key layout (classifier; the Flax paths are under 'backbone/' except norm and head):
  patch_embed.proj.{weight,bias}                            -> backbone/patch_embed            (conv 5->C, k4)
  network.{2i}.{j}.{norm1,norm2}.{weight,bias}             -> backbone/stage_i_block_j/norm1, norm2
  network.{2i}.{j}.token_mixer.{f,v,proj}.{weight,bias}    -> .../token_mixer/f, v, proj      (1x1 convs)
  network.{2i}.{j}.token_mixer.sim_alpha, sim_beta         -> .../token_mixer/sim_alpha, sim_beta
  network.{2i}.{j}.mlp.{fc1,fc2}.{weight,bias}             -> .../mlp/fc1, fc2                (Linear)
  network.{2i}.{j}.layer_scale_1, layer_scale_2            -> .../layer_scale_1, layer_scale_2
  network.{2i-1}.proj.{weight,bias}                        -> backbone/downsample_i           (conv k3 s2)
  norm.{weight,bias}, head.{weight,bias}                   -> norm, head
The dense-prediction variant (``ContextClusterBackbone(stage_norms=True)`` params, no 'backbone/' level)
uses norm0/norm2/norm4/norm6 -> norm_0..norm_3 instead of norm and head. Old checkpoints that store the MLP
as 1x1 convs (out, in, 1, 1) are accepted. Layouts: conv (O, I/g, kh, kw) -> (kh, kw, I/g, O); 1x1 conv
and Linear (O, I) -> Dense (I, O).

The generic pieces (``fill_params``, ``export_params``, ``read_checkpoint``) are shared with the PaCa-ViT
converter.

Usage:
  python -m clusterformer_jax.convert.timm_context_cluster --checkpoint coc_small.pth.tar \
      --model coc_small --output coc_small.safetensors [--ema]
``.pth``/``.pth.tar`` needs PyTorch; ``.safetensors`` (a flat state_dict) never does. The output has
Flax-path keys ('backbone/stage_0_block_0/...') that ``config.init_from`` reads.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from clusterformer_jax.convert.mmcls_clusterformer import read_checkpoint, run_converter_cli

Params = Dict[str, Any]
Path = Tuple[str, ...]
KeyFn = Callable[[Path], Tuple[str, str]]  # Flax path -> (state_dict key, layout kind)
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


# ---------------------------------------------------------------------------------------------------
# Generic layout conversion and matching.


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


def leaf_name(leaf: str) -> str:
    return _LEAF.get(leaf, leaf)


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


def abstract_params_of(model_name: str, image_size: int, **overrides: Any) -> Params:
    """Parameter shapes of registry preset ``model_name`` (``jax.eval_shape``, nothing allocated)."""
    from clusterformer_jax.models.registry import create_model

    model = create_model(model_name, **overrides)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, images))["params"]


# ---------------------------------------------------------------------------------------------------
# Context Cluster key mapping.


def torch_key(path: Path) -> Tuple[str, str]:
    """Flax param path (classifier or bare backbone) -> (timm state_dict key, layout kind)."""
    mods, leaf = list(path[:-1]), leaf_name(path[-1])
    if mods and mods[0] == "backbone":
        mods = mods[1:]
    if mods == ["head"]:
        return f"head.{leaf}", "linear"
    if mods == ["norm"]:
        return f"norm.{leaf}", "plain"
    if mods == ["patch_embed"]:
        return f"patch_embed.proj.{leaf}", "conv"
    if mods and (m := re.fullmatch(r"downsample_(\d)", mods[0])):
        return f"network.{2 * int(m[1]) - 1}.proj.{leaf}", "conv"
    if mods and (m := re.fullmatch(r"norm_(\d)", mods[0])):
        return f"norm{2 * int(m[1])}.{leaf}", "plain"
    if mods and (m := re.fullmatch(r"stage_(\d)_block_(\d+)", mods[0])):
        prefix = ".".join([f"network.{2 * int(m[1])}.{m[2]}", *mods[1:]])
        kind = "plain"
        if leaf == "weight" and len(mods) > 1 and mods[1] == "token_mixer":
            kind = "conv1x1"
        elif leaf == "weight" and len(mods) > 1 and mods[1] == "mlp":
            kind = "linear"
        return f"{prefix}.{leaf}", kind
    raise ValueError(f"no Context Cluster state_dict key for Flax parameter {'/'.join(path)}")


def flax_to_state_dict(params: Params) -> Dict[str, np.ndarray]:
    """Flax params of a Context Cluster model -> the timm state_dict (numpy arrays)."""
    return export_params(params, torch_key)


def state_dict_to_flax(state_dict: Mapping[str, Any], abstract_params: Params) -> Params:
    """Fills ``abstract_params`` (e.g. from ``jax.eval_shape(model.init, ...)``) from a timm state_dict."""
    return fill_params(
        state_dict, abstract_params, torch_key, hint="is the model preset right (coc_tiny vs coc_small ...)?"
    )


def convert(checkpoint: str, model_name: str, image_size: int = 224, ema: bool = False, **overrides: Any) -> Params:
    """Converts a released checkpoint into params of registry preset ``model_name`` (``ema``: the EMA weights)."""
    import clusterformer_jax.models.context_cluster  # noqa: F401  (registers the coc_* presets)

    state = read_checkpoint(checkpoint, "state_dict_ema" if ema else None)
    return state_dict_to_flax(state, abstract_params_of(model_name, image_size, **overrides))


def main(argv: Optional[list[str]] = None) -> None:
    run_converter_cli(__doc__.split("\n")[0], convert, "coc_tiny", argv, with_ema=True)


if __name__ == "__main__":
    main()
