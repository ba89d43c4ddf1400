"""Context Cluster (CoC, "Image as Set of Points", ICLR 2023): backbone and classifier.

Upstream: github.com/ma-xu/Context-Cluster, ``models/context_cluster.py``.

The image is a set of points: RGB plus two coordinate channels, embedded by a k4/s4 conv. Four stages of
pre-norm blocks (GroupNorm(1) -> cluster token mixer -> layer scale -> stochastic depth, then GroupNorm ->
channel MLP -> layer scale -> stochastic depth) are joined by k3/s2/p1 convs. The token mixer splits each
stage map into ``fold x fold`` regions, proposes ``proposal x proposal`` centers per region by adaptive
average pooling, assigns every point to its most similar center (sigmoid(alpha * cos + beta)), aggregates
the values of each cluster and dispatches the aggregate back to the cluster's points.

Activations are NHWC. Inside the mixer every (image, head, region) triple is a group of ``N`` points
(row-major) with ``head_dim`` channels, which is the order the upstream code's einops rearranges give.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models.layers import (
    DropPath,
    Mlp,
    adaptive_avg_pool,
    conv,
    first_argmax,
    group_norm,
    l2_normalize,
    pointwise,
    position_channels,
)
from clusterformer_jax.models.remat import remat

Dtype = Any
DENOMINATORS = ("similarity", "count")


def stage_sizes(height: int, width: int) -> List[tuple[int, int]]:
    """Feature-map sizes of the four stages: the stem is conv k4/s4/p0, each downsampler conv k3/s2/p1."""
    size = (height // 4, width // 4)
    sizes = [size]
    for _ in range(3):
        size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
        sizes.append(size)
    return sizes


class ClusterMixer(nn.Module):
    """The context-cluster token mixer: (B, H, W, dim) -> (B, H, W, dim).

    Fields:
      dim: input and output channels.
      heads, head_dim: the similarity/value width is heads * head_dim, split head-major.
      proposal: centers per region side (M = proposal**2 per region), pooled with PyTorch's bins.
      fold: regions per side; the region split only happens when fold > 1 (upstream checks both sides).
      denominator: 'similarity' divides each cluster's sum by (sum of its similarities + 1), the current
        upstream code; 'count' divides by (number of its points + 1), the code before commit 3ccb0b6.
    """

    dim: int
    heads: int
    head_dim: int
    proposal: int = 2
    fold: int = 1
    denominator: str = "similarity"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.denominator not in DENOMINATORS:
            raise ModelConfigError(f"model field denominator={self.denominator!r} is not one of {DENOMINATORS}")
        b, h, w, _ = x.shape
        heads, e = self.heads, self.head_dim
        inner = heads * e
        fold = max(self.fold, 1)  # 1: the whole map is one region
        if h % fold or w % fold:
            raise ModelConfigError(
                f"a {h}x{w} feature map is not divisible by fold {fold}; set model field folds to divisors "
                "of every stage's size"
            )
        value = pointwise(inner, self.dim, "v", self.dtype)(x)
        feat = pointwise(inner, self.dim, "f", self.dtype)(x)

        def split(t: jax.Array) -> jax.Array:  # (B, H, W, heads*e) -> (G, n_h, n_w, e)
            t = t.reshape(b, h, w, heads, e).transpose(0, 3, 1, 2, 4)  # b (e c) w h -> (b e) c w h
            t = t.reshape(b * heads, fold, h // fold, fold, w // fold, e)  # b c (f1 w) (f2 h) -> (b f1 f2) c w h
            return t.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h // fold, w // fold, e)

        value, feat = split(value), split(feat)
        g, n_h, n_w, _ = feat.shape
        m = self.proposal * self.proposal
        pool = (self.proposal, self.proposal)
        centers = adaptive_avg_pool(feat, pool).reshape(g, m, e)
        value_centers = adaptive_avg_pool(value, pool).reshape(g, m, e).astype(jnp.float32)
        points = feat.reshape(g, n_h * n_w, e)
        values = value.reshape(g, n_h * n_w, e).astype(jnp.float32)

        alpha = self.param("sim_alpha", nn.initializers.ones, (1,))
        beta = self.param("sim_beta", nn.initializers.zeros, (1,))
        cos = jnp.einsum(
            "gme,gne->gmn",
            l2_normalize(centers.astype(jnp.float32)),
            l2_normalize(points.astype(jnp.float32)),
        )
        sim = jax.nn.sigmoid(beta + alpha * cos)  # (G, M, N)
        if self.is_mutable_collection("intermediates"):  # the visualiser's point-to-center similarity
            self.sow("intermediates", "assignment", sim)
        mask = jax.nn.one_hot(first_argmax(sim, axis=1), m, axis=1, dtype=sim.dtype)  # each point: one center
        sim = sim * mask
        weight = sim if self.denominator == "similarity" else mask
        agg = (jnp.einsum("gmn,gne->gme", sim, values) + value_centers) / (jnp.sum(weight, axis=2, keepdims=True) + 1.0)
        out = jnp.einsum("gmn,gme->gne", sim, agg).astype(self.dtype)

        out = out.reshape(b, heads, fold, fold, n_h, n_w, e)  # undo the regions, then merge the heads
        out = out.transpose(0, 2, 4, 3, 5, 1, 6).reshape(b, h, w, inner)
        return pointwise(self.dim, inner, "proj", self.dtype)(out)


class ContextClusterBlock(nn.Module):
    """Pre-norm residual block: GN -> mixer -> gamma_1 -> DropPath; GN -> MLP -> gamma_2 -> DropPath."""

    dim: int
    mlp_ratio: float
    heads: int
    head_dim: int
    proposal: int
    fold: int
    denominator: str = "similarity"
    drop_path: float = 0.0
    drop: float = 0.0
    layer_scale_init: float = 1e-5
    dtype: Dtype = jnp.float32
    norm_impl: str = "ungrouped"  # layers.NORM_IMPLS

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        scale_init = nn.initializers.constant(self.layer_scale_init)
        gamma1 = self.param("layer_scale_1", scale_init, (self.dim,))
        gamma2 = self.param("layer_scale_2", scale_init, (self.dim,))
        mixer = ClusterMixer(
            self.dim,
            self.heads,
            self.head_dim,
            self.proposal,
            self.fold,
            self.denominator,
            self.dtype,
            name="token_mixer",
        )
        x = x + DropPath(self.drop_path)(
            gamma1 * mixer(group_norm("norm1", self.dtype, self.norm_impl)(x)), deterministic
        )
        hidden = int(self.dim * self.mlp_ratio)
        mlp = Mlp(hidden, self.drop, self.dtype, name="mlp")(
            group_norm("norm2", self.dtype, self.norm_impl)(x), deterministic
        )
        return x + DropPath(self.drop_path)(gamma2 * mlp, deterministic)


class _ContextClusterFields(nn.Module):
    """Architecture fields shared by the backbone and the classifier (defaults: coc_tiny)."""

    depths: Sequence[int] = (3, 4, 5, 2)
    dims: Sequence[int] = (32, 64, 196, 320)
    mlp_ratios: Sequence[float] = (8, 8, 4, 4)
    proposals: Sequence[int] = (2, 2, 2, 2)
    folds: Sequence[int] = (8, 4, 2, 1)
    num_heads: Sequence[int] = (4, 4, 8, 8)
    head_dim: int = 24
    denominator: str = "similarity"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-5
    remat: bool = False
    remat_impl: str = "barrier"
    remat_policy: str = "nothing_saveable"  # remat.REMAT_POLICIES
    norm_impl: str = "ungrouped"  # layers.NORM_IMPLS (an execution setting)
    dtype: Dtype = jnp.float32


_ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(_ContextClusterFields) if f.name not in ("parent", "name"))


class ContextClusterBackbone(_ContextClusterFields):
    """Images (B, H, W, 3) -> {'stages': [4 NHWC maps at strides 4, 8, 16, 32]}.

    ``stage_norms=False`` returns the raw stage outputs (the classifier normalises the last one itself);
    ``stage_norms=True`` adds the dense-prediction variant's GroupNorm per output (upstream norm0/2/4/6).
    """

    stage_norms: bool = False

    def _validate(self, images: jax.Array) -> None:
        per_stage = (self.depths, self.dims, self.mlp_ratios, self.proposals, self.folds, self.num_heads)
        if {len(v) for v in per_stage} != {4}:
            raise ModelConfigError("model fields depths/dims/mlp_ratios/proposals/folds/num_heads need 4 entries each")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ModelConfigError(f"expected NHWC RGB images, got shape {tuple(images.shape)}")
        for stage, ((h, w), fold) in enumerate(zip(stage_sizes(*images.shape[1:3]), self.folds)):
            if fold > 1 and (h % fold or w % fold):
                raise ModelConfigError(
                    f"input {images.shape[1]}x{images.shape[2]}: stage {stage + 1} map {h}x{w} is not divisible "
                    f"by model field folds[{stage}]={fold}; set folds to divisors of every stage size, e.g. "
                    "folds=(1,1,1,1): --config.model.kwargs.folds=1,1,1,1 with configs/coc_imagenet.py "
                    "(MODEL,quickstart for 32x32 digits sets it)"
                )

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, Any]:
        self._validate(images)
        x = position_channels(images.astype(self.dtype))
        x = conv(self.dims[0], 5, 4, 4, 0, "patch_embed", self.dtype)(x)
        block_cls = (
            remat(ContextClusterBlock, (2,), self.remat_impl, self.remat_policy) if self.remat else ContextClusterBlock
        )
        total, index, stages = sum(self.depths), 0, []
        for stage, depth in enumerate(self.depths):
            if stage:
                x = conv(self.dims[stage], self.dims[stage - 1], 3, 2, 1, f"downsample_{stage}", self.dtype)(x)
            for block in range(depth):
                x = block_cls(
                    dim=self.dims[stage],
                    mlp_ratio=self.mlp_ratios[stage],
                    heads=self.num_heads[stage],
                    head_dim=self.head_dim,
                    proposal=self.proposals[stage],
                    fold=self.folds[stage],
                    denominator=self.denominator,
                    drop_path=self.drop_path_rate * index / max(total - 1, 1),
                    drop=self.drop_rate,
                    layer_scale_init=self.layer_scale_init,
                    dtype=self.dtype,
                    norm_impl=self.norm_impl,
                    name=f"stage_{stage}_block_{block}",
                )(x, not train)
                index += 1
            stages.append(group_norm(f"norm_{stage}", self.dtype, self.norm_impl)(x) if self.stage_norms else x)
        return {"stages": stages}


class ContextClusterClassifier(_ContextClusterFields):
    """CoC classifier: backbone -> GroupNorm(1) -> global average pool -> Linear; float32 logits."""

    num_classes: int = 1000

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        arch = {name: getattr(self, name) for name in _ARCH_FIELDS}
        feats = ContextClusterBackbone(**arch, name="backbone")(images, train)
        x = group_norm("norm", self.dtype, self.norm_impl)(feats["stages"][-1])
        head = nn.Dense(
            self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.truncated_normal(0.02), name="head"
        )
        return head(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


# Published configurations (upstream ``models/context_cluster.py``). Drop-path follows the upstream README's
# training example (0.1).
_TINY = dict(depths=(3, 4, 5, 2), dims=(32, 64, 196, 320), num_heads=(4, 4, 8, 8), head_dim=24)
_DIM64 = dict(dims=(64, 128, 320, 512), head_dim=32)
_DEFAULTS = dict(mlp_ratios=(8, 8, 4, 4), proposals=(2, 2, 2, 2), folds=(8, 4, 2, 1), drop_path_rate=0.1)
PRESETS: Dict[str, Dict[str, Any]] = {
    name: dict(_DEFAULTS, **preset)
    for name, preset in {
        "coc_tiny": dict(_TINY, proposals=(2, 2, 2, 2), folds=(8, 4, 2, 1)),
        "coc_tiny2": dict(_TINY, proposals=(4, 2, 7, 4), folds=(7, 7, 1, 1)),
        "coc_tiny_plain": dict(_TINY, proposals=(4, 4, 2, 2), folds=(1, 1, 1, 1)),
        "coc_small": dict(_DIM64, depths=(2, 2, 6, 2), num_heads=(4, 4, 8, 8)),
        "coc_medium": dict(_DIM64, depths=(4, 4, 12, 4), num_heads=(6, 6, 12, 12)),
        "coc_base_dim64": dict(_DIM64, depths=(6, 6, 24, 6), num_heads=(8, 8, 16, 16)),
        "coc_base_dim96": dict(depths=(4, 4, 12, 4), dims=(96, 192, 384, 768), num_heads=(8, 8, 16, 16), head_dim=32),
    }.items()
}
