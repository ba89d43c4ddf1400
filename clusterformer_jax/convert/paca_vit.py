"""PaCa-ViT checkpoints (plain state_dict, upstream iVMCL/PaCaViT) <-> Flax params of ``paca_vit`` models.

Key layout (classifier; Flax paths under 'backbone/' except head; stage i and block j count from 0 in
Flax, stages from 1 upstream):
  patch_embed.proj.{0,1}.{weight,bias}                 -> backbone/patch_embed_conv_{0,1}   (conv k3 s2)
  patch_embed.norm.{weight,bias}                       -> backbone/patch_embed_norm
  stage{i+1}.{j}.norm1_before / norm2_before           -> backbone/stage_i_block_j/norm1 / norm2
  stage{i+1}.{j}.attn.{q,k,v,proj}.{weight,bias}       -> .../attn/q, k, v, proj             (Linear)
  stage{i+1}.{j}.attn.cluster_norm.{weight,bias}       -> .../attn/cluster_norm
  stage{i+1}.{j}.attn.clustering.clustering.0 / 2 / 4  -> .../attn/clustering/dwconv / pwconv / to_clusters
                                                          (conv type: dw k7 conv, 1x1 conv, 1x1 conv no bias)
  stage{i+1}.{j}.attn.clustering.clustering.0 / 2      -> .../attn/clustering/fc1 / fc2     (mlp type, Linear)
  stage{i+1}.{j}.attn.clustering.clustering.0          -> .../attn/clustering/fc            (linear type)
  stage{i+1}.{j}.mlp.fc1, mlp.fc2 / mlp.dwconv.dwconv  -> .../mlp/fc1, fc2 / dwconv        (Linear / dw k3)
  norm{i+1}.{weight,bias}                              -> backbone/norm_i
  transition{i}.proj / transition{i}.norm              -> backbone/transition_i / transition_i_norm
  head.{weight,bias}                                   -> head
A bare ``PaCaViTBackbone`` params tree (the ``*_downstream`` layout, no head) maps the same way.

Usage:
  python -m clusterformer_jax.convert.paca_vit --checkpoint pacavit_small.pth \
      --model pacavit_small_p2cconv_100_0 --output pacavit_small.safetensors
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from clusterformer_jax.convert.common import (
    Params,
    Path,
    abstract_variables,
    export_params,
    fill_params,
    leaf_name,
    read_checkpoint,
    run_converter_cli,
)

_CLUSTERING = {  # Flax module under attn/clustering -> (nn.Sequential index, layout kind)
    "dwconv": ("0", "conv"),
    "pwconv": ("2", "conv1x1"),
    "to_clusters": ("4", "conv1x1"),
    "fc1": ("0", "linear"),
    "fc2": ("2", "linear"),
    "fc": ("0", "linear"),
}
_BLOCK = {"norm1": "norm1_before", "norm2": "norm2_before"}


def _block_key(rest: list[str], leaf: str) -> Tuple[str, str]:
    """Key suffix and layout kind inside one PaCa block."""
    if rest[0] in _BLOCK:
        return f"{_BLOCK[rest[0]]}.{leaf}", "plain"
    kind = "linear" if leaf == "weight" else "plain"
    if rest[:2] == ["attn", "clustering"]:
        index, kind = _CLUSTERING[rest[2]]
        return f"attn.clustering.clustering.{index}.{leaf}", kind if leaf == "weight" else "plain"
    if rest[:2] == ["attn", "cluster_norm"]:
        return f"attn.cluster_norm.{leaf}", "plain"
    if rest[:2] == ["mlp", "dwconv"]:
        return f"mlp.dwconv.dwconv.{leaf}", "conv" if leaf == "weight" else "plain"
    return ".".join(rest + [leaf]), kind


def torch_key(path: Path) -> Tuple[str, str]:
    """Flax param path (classifier or bare backbone) -> (PaCa state_dict key, layout kind)."""
    mods, leaf = list(path[:-1]), leaf_name(path[-1])
    if mods and mods[0] == "backbone":
        mods = mods[1:]
    name = mods[0] if mods else ""
    if name == "head":
        return f"head.{leaf}", "linear"
    if m := re.fullmatch(r"patch_embed_conv_(\d)", name):
        return f"patch_embed.proj.{m[1]}.{leaf}", "conv"
    if name == "patch_embed_norm":
        return f"patch_embed.norm.{leaf}", "plain"
    if m := re.fullmatch(r"norm_(\d)", name):
        return f"norm{int(m[1]) + 1}.{leaf}", "plain"
    if m := re.fullmatch(r"transition_(\d)", name):
        return f"transition{m[1]}.proj.{leaf}", "conv"
    if m := re.fullmatch(r"transition_(\d)_norm", name):
        return f"transition{m[1]}.norm.{leaf}", "plain"
    if (m := re.fullmatch(r"stage_(\d)_block_(\d+)", name)) and len(mods) > 1:
        suffix, kind = _block_key(mods[1:], leaf)
        return f"stage{int(m[1]) + 1}.{m[2]}.{suffix}", kind
    raise ValueError(f"no PaCa-ViT state_dict key for Flax parameter {'/'.join(path)}")


def flax_to_state_dict(params: Params) -> Dict[str, np.ndarray]:
    """Flax params of a PaCa-ViT model -> the upstream state_dict (numpy arrays)."""
    return export_params(params, torch_key)


def state_dict_to_flax(state_dict: Mapping[str, Any], abstract_params: Params) -> Params:
    """Fills ``abstract_params`` (e.g. from ``jax.eval_shape(model.init, ...)``) from a PaCa state_dict."""
    return fill_params(
        state_dict,
        abstract_params,
        torch_key,
        hint="is the model preset right (size, clustering type, cluster counts, stage- vs block-wise)?",
    )


def convert(checkpoint: str, model_name: str, image_size: int = 224, **overrides: Any) -> Params:
    """Converts a released checkpoint into params of registry preset ``model_name``."""
    abstract = abstract_variables(model_name, image_size, **overrides)["params"]
    return state_dict_to_flax(read_checkpoint(checkpoint), abstract)


def main(argv: Optional[list[str]] = None) -> None:
    run_converter_cli(__doc__.split("\n")[0], convert, "pacavit_tiny_p2cconv_100_0", argv)


if __name__ == "__main__":
    main()
