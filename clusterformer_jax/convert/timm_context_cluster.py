"""Context Cluster timm checkpoints (upstream ma-xu/Context-Cluster) <-> Flax params of ``context_cluster`` models.

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

Usage:
  python -m clusterformer_jax.convert.timm_context_cluster --checkpoint coc_small.pth.tar \
      --model coc_small --output coc_small.safetensors [--ema]
``.pth``/``.pth.tar`` needs PyTorch; ``.safetensors`` (a flat state_dict) never does. The output has
Flax-path keys ('backbone/stage_0_block_0/...') that ``config.init_from`` reads.
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
    to_torch,
)

__all__ = ["torch_key", "flax_to_state_dict", "state_dict_to_flax", "convert", "main", "to_torch"]


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
    state = read_checkpoint(checkpoint, "state_dict_ema" if ema else None)
    return state_dict_to_flax(state, abstract_variables(model_name, image_size, **overrides)["params"])


def main(argv: Optional[list[str]] = None) -> None:
    run_converter_cli(__doc__.split("\n")[0], convert, "coc_tiny", argv, with_ema=True)


if __name__ == "__main__":
    main()
