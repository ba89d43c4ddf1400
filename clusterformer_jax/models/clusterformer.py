"""ClusterFormer backbone and classifier (paper §3.2-3.3), and its presets.

Stem: RGB + two coordinate channels -> conv k4 s4. Four stages of ``ClusterBlock``s joined by conv k3 s2
(explicit padding 1, as PyTorch). Each block is pre-norm GroupNorm(1, eps 1e-5) -> clustering mixer ->
layer scale -> stochastic depth, then GroupNorm -> MLP -> layer scale -> stochastic depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models.clustering import ClusteringMixer, MixerConfig
from clusterformer_jax.models.layers import DropPath, Mlp, conv, group_norm, position_channels
from clusterformer_jax.models.remat import remat

Dtype = Any
HEADS = ("official_neck", "paper_centers")


class ClusterBlock(nn.Module):
    dim: int
    heads: int
    windows: int
    mlp_ratio: float
    mixer: MixerConfig
    drop_path: float = 0.0
    drop: float = 0.0
    layer_scale_init: float = 1e-5
    dtype: Dtype = jnp.float32
    norm_impl: str = "ungrouped"  # layers.NORM_IMPLS

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> Tuple[jax.Array, jax.Array]:
        scale_init = nn.initializers.constant(self.layer_scale_init)
        gamma1 = self.param("layer_scale_1", scale_init, (self.dim,))
        gamma2 = self.param("layer_scale_2", scale_init, (self.dim,))
        mixer = ClusteringMixer(self.dim, self.heads, self.windows, self.mixer, self.dtype, name="token_mixer")
        mixed, centers = mixer(group_norm("norm1", self.dtype, self.norm_impl)(x))
        x = x + DropPath(self.drop_path)(gamma1 * mixed, deterministic)
        hidden = int(self.dim * self.mlp_ratio)
        mlp = Mlp(hidden, self.drop, self.dtype, name="mlp")(
            group_norm("norm2", self.dtype, self.norm_impl)(x), deterministic
        )
        x = x + DropPath(self.drop_path)(gamma2 * mlp, deterministic)
        return x, centers


class ClusterFormerBackbone(nn.Module):
    """Hierarchical backbone: images -> {'stages': [4 GroupNorm'd NHWC maps], 'centers': (B, M, inner)}.

    ``centers`` are the last block's cluster centers (all windows of the last stage), which the paper's
    classification head and the dense decoders' query initialisation consume. ``mixer`` configures every
    block's clustering; ``remat`` recomputes each block in the backward pass (``remat_impl``: see remat.py).
    """

    depths: Sequence[int] = (2, 2, 6, 2)
    dims: Sequence[int] = (96, 192, 384, 768)
    mlp_ratios: Sequence[float] = (8, 8, 4, 4)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_counts: Sequence[int] = (8, 4, 2, 1)
    mixer: MixerConfig = MixerConfig()
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-5
    remat: bool = False
    remat_impl: str = "barrier"
    remat_policy: str = "nothing_saveable"  # remat.REMAT_POLICIES
    norm_impl: str = "ungrouped"  # layers.NORM_IMPLS (an execution setting)
    dtype: Dtype = jnp.float32

    def _validate(self, images: jax.Array) -> None:
        lengths = {len(v) for v in (self.depths, self.dims, self.mlp_ratios, self.num_heads, self.window_counts)}
        if lengths != {4}:
            raise ModelConfigError("model fields depths/dims/mlp_ratios/num_heads/window_counts need 4 entries each")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ModelConfigError(f"expected NHWC RGB images, got shape {tuple(images.shape)}")
        size = list(images.shape[1:3])
        if size[0] % 4 or size[1] % 4:
            raise ModelConfigError(f"input {size[0]}x{size[1]} must be a multiple of 4 (the stem is conv k4 s4)")
        for stage, count in enumerate(self.window_counts):
            size = [(s + 1) // 2 for s in size] if stage else [s // 4 for s in size]
            if count > 1 and (size[0] % count or size[1] % count):
                raise ModelConfigError(
                    f"input {images.shape[1]}x{images.shape[2]}: stage {stage + 1} map {size[0]}x{size[1]} is "
                    f"not divisible by window count {count}; set --config.model.kwargs.window_counts to divisors of "
                    "the stage sizes (e.g. '(8,4,2,1)' for 224, '(32,16,8,4)' for 512)"
                )

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, Any]:
        self._validate(images)
        x = position_channels(images.astype(self.dtype))
        x = conv(self.dims[0], 5, 4, 4, 0, "patch_embed", self.dtype)(x)
        total = sum(self.depths)
        block_cls = remat(ClusterBlock, (2,), self.remat_impl, self.remat_policy) if self.remat else ClusterBlock
        stages, centers, index = [], None, 0
        for stage, depth in enumerate(self.depths):
            if stage:
                x = conv(self.dims[stage], self.dims[stage - 1], 3, 2, 1, f"downsample_{stage}", self.dtype)(x)
            for block in range(depth):
                x, centers = block_cls(
                    self.dims[stage],
                    self.num_heads[stage],
                    self.window_counts[stage],
                    self.mlp_ratios[stage],
                    self.mixer,
                    self.drop_path_rate * index / max(total - 1, 1),
                    self.drop_rate,
                    self.layer_scale_init,
                    self.dtype,
                    self.norm_impl,
                    name=f"stage_{stage}_block_{block}",
                )(x, not train)
                index += 1
            stages.append(group_norm(f"norm_{stage}", self.dtype, self.norm_impl)(x))
        return {"stages": stages, "centers": centers}


class ClusterFormer(nn.Module):
    """The ClusterFormer classifier: ``__call__(images, train)`` -> float32 logits.

    ``head='official_neck'``: GroupNorm'd outputs of all four stages, global-average-pooled and
    concatenated (96+192+384+768 = 1440 for tiny) -> Linear, as the released mmcls neck/head.
    ``head='paper_centers'``: the paper's single-layer MLP on the last stage's cluster centers.
    ``backbone``: the ``ClusterFormerBackbone`` fields.
    """

    num_classes: int = 1000
    head: str = "official_neck"
    backbone: Dict[str, Any] = None
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if self.head not in HEADS:
            raise ModelConfigError(f"model field head={self.head!r} is not one of {HEADS}")
        feats = ClusterFormerBackbone(
            drop_rate=self.drop_rate, dtype=self.dtype, name="backbone", **(self.backbone or {})
        )(images, train)
        if self.head == "official_neck":
            pooled = jnp.concatenate([jnp.mean(s, axis=(1, 2)) for s in feats["stages"]], axis=-1)
            init = nn.initializers.normal(0.01)
        else:
            pooled = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="head_norm")(jnp.mean(feats["centers"], axis=1))
            init = nn.initializers.truncated_normal(0.02)
        pooled = nn.Dropout(self.drop_rate)(pooled, not train)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init, name="head")(pooled)
        return logits.astype(jnp.float32)


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


_TOP_FIELDS = _names(ClusterFormer) - {"backbone"}
_MIXER_FIELDS = _names(MixerConfig)
_BACKBONE_FIELDS = _names(ClusterFormerBackbone) - {"mixer", "drop_rate", "dtype"}
FIELDS = _TOP_FIELDS | _MIXER_FIELDS | _BACKBONE_FIELDS


def from_fields(**fields: Any) -> ClusterFormer:
    """A classifier from flat fields (the registry's and the configs' form): mixer fields go to its
    ``MixerConfig``, backbone fields to the backbone, the rest to the classifier."""
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise ModelConfigError(f"ClusterFormer has no field {unknown[0]!r}; valid: {sorted(FIELDS)}")
    mixer = MixerConfig(**{k: v for k, v in fields.items() if k in _MIXER_FIELDS})
    backbone = {k: v for k, v in fields.items() if k in _BACKBONE_FIELDS}
    return ClusterFormer(backbone=dict(backbone, mixer=mixer), **{k: v for k, v in fields.items() if k in _TOP_FIELDS})


# The released code (github.com/ClusterFormer/ClusterFormer, mmcls configs) with window counts [8,4,2,1]
# so that 224 inputs work.
_OFFICIAL = dict(
    dims=(96, 192, 384, 768),
    mlp_ratios=(8, 8, 4, 4),
    num_heads=(3, 6, 12, 24),
    head_dim=32,
    window_counts=(8, 4, 2, 1),
    centers=(10, 10),
    estep_axis="clusters",
    query_proj=True,
    mstep="sum",
    center_ffn=False,
    dispatch="official",
    partition="raw",
    head="official_neck",
)

# The paper's design (§3.2-3.3, "the architecture and configuration of Swin Transformer"): Swin widths,
# depths, heads and MLP ratio 4, 7x7-token spatial windows, Eq. 5 center FFN, Eq. 6 dispatch, and the
# single-layer head on the cluster centers.
_PAPER = dict(
    dims=(96, 192, 384, 768),
    mlp_ratios=(4, 4, 4, 4),
    num_heads=(3, 6, 12, 24),
    head_dim=32,
    window_counts=(8, 4, 2, 1),
    centers=(10, 10),
    num_iters=3,
    estep_axis="clusters",
    query_proj=True,
    mstep="sum",
    center_ffn=True,
    dispatch="paper",
    partition="spatial",
    head="paper_centers",
)

PRESETS: Dict[str, Dict[str, Any]] = {
    "clusterformer_tiny": dict(_PAPER, depths=(2, 2, 6, 2), drop_path_rate=0.2),
    "clusterformer_small": dict(_PAPER, depths=(2, 2, 18, 2), drop_path_rate=0.3),
    "clusterformer_base": dict(
        _PAPER, depths=(2, 2, 18, 2), dims=(128, 256, 512, 1024), num_heads=(4, 8, 16, 32), drop_path_rate=0.5
    ),
    # Released configs: tiny uses T=3, small silently runs with the default T=1; neither sets drop-path.
    "clusterformer_tiny_official": dict(_OFFICIAL, depths=(2, 2, 6, 2), num_iters=3),
    "clusterformer_small_official": dict(_OFFICIAL, depths=(2, 2, 18, 2), num_iters=1),
    # Quickstart: 32x32 digits (stage maps 8/4/2/1), whole-map clustering with 4x4 centers.
    "clusterformer_nano": dict(
        _PAPER,
        depths=(1, 1, 2, 1),
        dims=(32, 64, 128, 192),
        num_heads=(1, 2, 4, 6),
        head_dim=32,
        mlp_ratios=(4, 4, 4, 4),
        window_counts=(1, 1, 1, 1),
        centers=(4, 4),
        num_iters=3,
        head="official_neck",
        num_classes=10,
    ),
}
