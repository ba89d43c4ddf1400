"""ClusterFormer backbone and classifier (paper §3.2-3.3; released code in seed_systems.md §2).

Stem: RGB + two coordinate channels -> conv k4 s4. Four stages of ``ClusterBlock``s joined by conv k3 s2
(explicit padding 1, as PyTorch). Each block is pre-norm GroupNorm(1, eps 1e-5) -> clustering mixer ->
layer scale -> stochastic depth, then GroupNorm -> MLP -> layer scale -> stochastic depth.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusterformer_jax.models.clustering import (
    ClusteringMixer,
    ModelConfigError,
    gelu,
    torch_default_bias_init,
    torch_default_kernel_init,
)
from clusterformer_jax.models.remat import remat

Dtype = Any
HEADS = ("official_neck", "paper_centers")


def position_channels(images: jax.Array) -> jax.Array:
    """Appends row/(H-1)-0.5 and col/(W-1)-0.5 coordinate channels to NHWC images."""
    b, h, w, _ = images.shape
    rows = jnp.arange(h, dtype=images.dtype) / max(h - 1, 1) - 0.5
    cols = jnp.arange(w, dtype=images.dtype) / max(w - 1, 1) - 0.5
    grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1)
    return jnp.concatenate([images, jnp.broadcast_to(grid, (b, h, w, 2))], axis=-1)


def group_norm(name: str, dtype: Dtype) -> nn.GroupNorm:
    """GroupNorm(1, C) with PyTorch's epsilon: normalises over (H, W, C) per sample."""
    return nn.GroupNorm(num_groups=1, epsilon=1e-5, dtype=dtype, name=name)


def conv(features: int, fan_in: int, kernel: int, stride: int, pad: int, name: str, dtype: Dtype):
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        kernel_init=torch_default_kernel_init(),
        bias_init=torch_default_bias_init(fan_in * kernel * kernel),
        name=name,
    )


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability ``rate``."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        rng = self.make_rng("dropout")
        mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Mlp(nn.Module):
    """1x1 conv -> exact GELU -> dropout -> 1x1 conv -> dropout (trunc-normal 0.02 init, zero bias)."""

    hidden: int
    drop: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        init = nn.initializers.truncated_normal(0.02)
        dim = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=init, name="fc1")(x)
        x = nn.Dropout(self.drop)(gelu(x), deterministic)
        x = nn.Dense(dim, dtype=self.dtype, kernel_init=init, name="fc2")(x)
        return nn.Dropout(self.drop)(x, deterministic)


class ClusterBlock(nn.Module):
    dim: int
    mlp_ratio: float
    mixer: Dict[str, Any]
    drop_path: float = 0.0
    drop: float = 0.0
    layer_scale_init: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> Tuple[jax.Array, jax.Array]:
        scale_init = nn.initializers.constant(self.layer_scale_init)
        gamma1 = self.param("layer_scale_1", scale_init, (self.dim,))
        gamma2 = self.param("layer_scale_2", scale_init, (self.dim,))
        mixed, centers = ClusteringMixer(self.dim, dtype=self.dtype, name="token_mixer", **self.mixer)(
            group_norm("norm1", self.dtype)(x)
        )
        x = x + DropPath(self.drop_path)(gamma1 * mixed, deterministic)
        hidden = int(self.dim * self.mlp_ratio)
        mlp = Mlp(hidden, self.drop, self.dtype, name="mlp")(group_norm("norm2", self.dtype)(x), deterministic)
        x = x + DropPath(self.drop_path)(gamma2 * mlp, deterministic)
        return x, centers


class ClusterFormerBackbone(nn.Module):
    """Hierarchical backbone: images -> {'stages': [4 GroupNorm'd NHWC maps], 'centers': (B, M, inner)}.

    ``centers`` are the last block's cluster centers (all windows of the last stage), which the paper's
    classification head and the dense decoders' query initialisation consume.
    """

    depths: Sequence[int] = (2, 2, 6, 2)
    dims: Sequence[int] = (96, 192, 384, 768)
    mlp_ratios: Sequence[float] = (8, 8, 4, 4)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    head_dim: int = 32
    window_counts: Sequence[int] = (8, 4, 2, 1)
    centers: Tuple[int, int] = (10, 10)
    num_iters: int = 3
    estep_axis: str = "clusters"
    query_proj: bool = True
    mstep: str = "sum"
    center_ffn: bool = False
    dispatch: str = "official"
    partition: str = "raw"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-5
    remat: bool = False
    em_remat: bool = True
    em_unroll: Optional[int] = None
    group_chunk: Optional[int] = None
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
            if stage:
                size = [(s + 1) // 2 for s in size]
            else:
                size = [s // 4 for s in size]
            if count > 1 and (size[0] % count or size[1] % count):
                raise ModelConfigError(
                    f"input {images.shape[1]}x{images.shape[2]}: stage {stage + 1} map {size[0]}x{size[1]} is "
                    f"not divisible by window count {count}; set model.window_counts to divisors of the "
                    "stage sizes (e.g. [8,4,2,1] for 224, [32,16,8,4] for 512)"
                )

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, Any]:
        self._validate(images)
        x = position_channels(images.astype(self.dtype))
        x = conv(self.dims[0], 5, 4, 4, 0, "patch_embed", self.dtype)(x)
        total = sum(self.depths)
        block_cls = remat(ClusterBlock, static_argnums=(2,)) if self.remat else ClusterBlock
        stages, centers, index = [], None, 0
        for stage, depth in enumerate(self.depths):
            if stage:
                x = conv(self.dims[stage], self.dims[stage - 1], 3, 2, 1, f"downsample_{stage}", self.dtype)(x)
            mixer = dict(
                heads=self.num_heads[stage],
                head_dim=self.head_dim,
                windows=self.window_counts[stage],
                centers=tuple(self.centers),
                num_iters=self.num_iters,
                estep_axis=self.estep_axis,
                query_proj=self.query_proj,
                mstep=self.mstep,
                center_ffn=self.center_ffn,
                dispatch=self.dispatch,
                partition=self.partition,
                em_remat=self.em_remat,
                em_unroll=self.em_unroll,
                group_chunk=self.group_chunk,
            )
            for block in range(depth):
                rate = self.drop_path_rate * index / max(total - 1, 1)
                x, centers = block_cls(
                    self.dims[stage],
                    self.mlp_ratios[stage],
                    mixer,
                    rate,
                    self.drop_rate,
                    self.layer_scale_init,
                    self.dtype,
                    name=f"stage_{stage}_block_{block}",
                )(x, not train)
                index += 1
            stages.append(group_norm(f"norm_{stage}", self.dtype)(x))
        return {"stages": stages, "centers": centers}


class ClusterFormer(nn.Module):
    """The ClusterFormer classifier: ``__call__(images, train)`` -> float32 logits.

    ``head='official_neck'``: GroupNorm'd outputs of all four stages, global-average-pooled and
    concatenated (96+192+384+768 = 1440 for tiny) -> Linear, as the released mmcls neck/head.
    ``head='paper_centers'``: the paper's single-layer MLP on the last stage's cluster centers.
    Every other field is passed to ``ClusterFormerBackbone``.
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
