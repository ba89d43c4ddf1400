"""PaCa-ViT ("Learning Patch-to-Cluster Attention in Vision Transformers", CVPR 2023).

Upstream: github.com/iVMCL/PaCaViT, ``models/paca_vit.py``.

Queries are the patches; keys and values are M cluster tokens, each a softmax-over-patches weighted sum
of the (normalised) patches, so attention costs O(N*M) instead of O(N^2). A stage computes the
assignment in its first block ("stage-wise", the default) or in every block ("block-wise") and the other
blocks reuse the last one. A stage with M = 0 is plain multi-head self-attention.

Also here: ``PaCaSegHead``, the PaCa semantic-segmentation head (upstream ``segmentation/``), and ``paca_seg_loss``.

Activations inside a stage are token sequences (B, N, C), row-major over (H, W); stage outputs are NHWC.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models.layers import DepthwiseConv, DropPath, gelu
from clusterformer_jax.models.remat import remat

Dtype = Any
CLUSTERINGS = ("conv", "mlp", "linear")
LN_EPS = 1e-6


def _trunc_normal() -> Callable:
    return nn.initializers.truncated_normal(0.02)


def _conv_init(kernel: int, features: int, groups: int = 1) -> Callable:
    """PaCa's conv init: normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups."""
    return nn.initializers.normal(math.sqrt(2.0 / (kernel * kernel * features // groups)))


def _conv(
    features: int,
    kernel: int,
    stride: int,
    name: str,
    dtype: Dtype,
    groups: int = 1,
    use_bias: bool = True,
    depthwise_impl: str = "grouped",
) -> nn.Module:
    """k x k conv with PyTorch's symmetric padding (k-1)/2 (never 'SAME', which pads stride-2 convs 0/1)."""
    if groups == features and groups > 1:  # depthwise
        init = _conv_init(kernel, features, groups)
        return DepthwiseConv(kernel, stride, use_bias, dtype, init, nn.initializers.zeros, depthwise_impl, name=name)
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=_conv_init(kernel, features, groups),
        name=name,
    )


def _dense(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=_trunc_normal(), name=name)


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


def onsite_clustering(block: int, onsite: int) -> bool:
    """Whether block ``block`` of a stage computes its own assignment (0: first only, 1: all, k>1: every k)."""
    if block == 0:
        return True
    return bool(onsite) if onsite < 2 else block % onsite == 0


class P2CConv(nn.Module):
    """Conv clustering: dw k x k conv -> GELU -> 1x1 -> GELU -> 1x1 to M (no bias); (B,H,W,C) -> (B,M,N)."""

    num_clusters: int
    kernel: int = 7
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = gelu(_conv(c, self.kernel, 1, "dwconv", self.dtype, groups=c, depthwise_impl=self.depthwise_impl)(x))
        pw = lambda f, n, bias=True: nn.Dense(  # noqa: E731  1x1 convs with PaCa's conv init
            f, use_bias=bias, dtype=self.dtype, kernel_init=_conv_init(1, f), name=n
        )
        x = gelu(pw(c, "pwconv")(x))
        x = pw(self.num_clusters, "to_clusters", False)(x)
        return x.reshape(b, h * w, self.num_clusters).transpose(0, 2, 1)


class P2CMlp(nn.Module):
    """MLP clustering: Linear(C -> r*C) -> GELU -> Linear(-> M); (B,H,W,C) -> (B,M,N)."""

    num_clusters: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = gelu(_dense(int(c * self.mlp_ratio), "fc1", self.dtype)(x))
        x = _dense(self.num_clusters, "fc2", self.dtype)(x)
        return x.reshape(b, h * w, self.num_clusters).transpose(0, 2, 1)


class P2CLinear(nn.Module):
    """Linear clustering (untested upstream): Linear(C -> M, no bias); (B,H,W,C) -> (B,M,N)."""

    num_clusters: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        x = _dense(self.num_clusters, "fc", self.dtype, use_bias=False)(x)
        return x.reshape(b, h * w, self.num_clusters).transpose(0, 2, 1)


class PaCaAttention(nn.Module):
    """Patch-to-cluster attention: (x (B,N,C), assignment z or None) -> (out (B,N,C), z).

    ``num_clusters == 0`` is plain MHSA. Otherwise a computing block (``compute_clusters``) forms
    z = softmax_N(clustering(x)); every block forms cluster tokens LN(z @ x) from its own input x.
    """

    dim: int
    heads: int
    num_clusters: int
    compute_clusters: bool
    clustering: str = "conv"
    kernel: int = 7
    mlp_ratio: float = 4.0
    attn_drop: float = 0.0
    drop: float = 0.0
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(
        self, x: jax.Array, hw: Tuple[int, int], z: Optional[jax.Array], deterministic: bool
    ) -> Tuple[jax.Array, Optional[jax.Array]]:
        b, n, c = x.shape
        if self.num_clusters > 0:
            if self.compute_clusters:
                grid = x.reshape(b, *hw, c)
                if self.clustering == "conv":
                    module = P2CConv(self.num_clusters, self.kernel, self.dtype, self.depthwise_impl, name="clustering")
                elif self.clustering == "mlp":
                    module = P2CMlp(self.num_clusters, self.mlp_ratio, self.dtype, name="clustering")
                else:
                    module = P2CLinear(self.num_clusters, self.dtype, name="clustering")
                z = jax.nn.softmax(module(grid).astype(jnp.float32), axis=-1)  # over the N patches
            if z is None:
                raise ModelConfigError("a PaCa block that reuses the cluster assignment got none")
            tokens = jnp.einsum("bmn,bnc->bmc", z.astype(x.dtype), x)
            tokens = _layer_norm("cluster_norm", self.dtype)(tokens)
        else:
            tokens = x
        d = c // self.heads
        q = _dense(c, "q", self.dtype)(x).reshape(b, n, self.heads, d)
        k = _dense(c, "k", self.dtype)(tokens).reshape(b, -1, self.heads, d)
        v = _dense(c, "v", self.dtype)(tokens).reshape(b, -1, self.heads, d)
        logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
        attn = nn.Dropout(self.attn_drop)(jax.nn.softmax(logits, axis=-1), deterministic)
        out = jnp.einsum("bhnm,bmhd->bnhd", attn.astype(v.dtype), v).reshape(b, n, c)
        out = nn.Dropout(self.drop)(_dense(c, "proj", self.dtype)(out), deterministic)
        return out, z


class PaCaMlp(nn.Module):
    """fc1 -> (h + dwconv3x3(h)) -> GELU -> dropout -> fc2 -> dropout, on (B, N, C) tokens."""

    hidden: int
    drop: float = 0.0
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array, hw: Tuple[int, int], deterministic: bool) -> jax.Array:
        b, n, c = x.shape
        h = _dense(self.hidden, "fc1", self.dtype)(x)
        dwconv = _conv(self.hidden, 3, 1, "dwconv", self.dtype, groups=self.hidden, depthwise_impl=self.depthwise_impl)
        dw = dwconv(h.reshape(b, *hw, self.hidden))
        h = h + dw.reshape(b, n, self.hidden)
        h = nn.Dropout(self.drop)(gelu(h), deterministic)
        return nn.Dropout(self.drop)(_dense(c, "fc2", self.dtype)(h), deterministic)


class PaCaBlock(nn.Module):
    """Pre-norm block: x + DropPath(PaCa(LN(x))), then x + DropPath(Mlp(LN(x))); carries the assignment."""

    dim: int
    heads: int
    num_clusters: int
    compute_clusters: bool
    mlp_ratio: float = 4.0
    clustering: str = "conv"
    kernel: int = 7
    drop_path: float = 0.0
    attn_drop: float = 0.0
    drop: float = 0.0
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(
        self, x: jax.Array, z: Optional[jax.Array], hw: Tuple[int, int], deterministic: bool
    ) -> Tuple[jax.Array, Optional[jax.Array]]:
        attn = PaCaAttention(
            self.dim,
            self.heads,
            self.num_clusters,
            self.compute_clusters,
            self.clustering,
            self.kernel,
            self.mlp_ratio,
            self.attn_drop,
            self.drop,
            self.dtype,
            self.depthwise_impl,
            name="attn",
        )
        a, z = attn(_layer_norm("norm1", self.dtype)(x), hw, z, deterministic)
        x = x + DropPath(self.drop_path)(a, deterministic)
        mlp = PaCaMlp(int(self.dim * self.mlp_ratio), self.drop, self.dtype, self.depthwise_impl, name="mlp")
        x = x + DropPath(self.drop_path)(mlp(_layer_norm("norm2", self.dtype)(x), hw, deterministic), deterministic)
        return x, z


class _PaCaFields(nn.Module):
    """Architecture fields shared by the backbone and the classifier (defaults: PaCa-Tiny, conv, 100_0)."""

    depths: Sequence[int] = (2, 2, 4, 2)
    dims: Sequence[int] = (96, 192, 320, 384)
    num_heads: Sequence[int] = (2, 4, 8, 16)
    mlp_ratios: Sequence[float] = (4, 4, 4, 4)
    clusters: Sequence[int] = (100, 100, 100, 0)
    onsite: Sequence[int] = (0, 0, 0, 0)
    clustering: str = "conv"
    clustering_kernel: int = 7
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    remat: bool = False
    remat_impl: str = "barrier"
    remat_policy: str = "nothing_saveable"  # remat.REMAT_POLICIES
    depthwise_impl: str = "grouped"
    dtype: Dtype = jnp.float32


_ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(_PaCaFields) if f.name not in ("parent", "name"))


class PaCaViTBackbone(_PaCaFields):
    """Images (B, H, W, 3) -> {'stages': [4 NHWC maps, each after its stage LayerNorm]}.

    Stem: conv k3/s2 (C0/2) -> conv k3/s2 (C0) -> channel LayerNorm. Transitions: conv k3/s2 -> LayerNorm.
    """

    def _validate(self, images: jax.Array) -> None:
        per_stage = (self.depths, self.dims, self.num_heads, self.mlp_ratios, self.clusters, self.onsite)
        if {len(v) for v in per_stage} != {4}:
            raise ModelConfigError("model fields depths/dims/num_heads/mlp_ratios/clusters/onsite need 4 entries each")
        if self.clustering not in CLUSTERINGS:
            raise ModelConfigError(f"model field clustering={self.clustering!r} is not one of {CLUSTERINGS}")
        for stage, (dim, heads) in enumerate(zip(self.dims, self.num_heads)):
            if dim % heads:
                raise ModelConfigError(
                    f"model field dims[{stage}]={dim} is not divisible by num_heads[{stage}]={heads}"
                )
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ModelConfigError(f"expected NHWC RGB images, got shape {tuple(images.shape)}")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, Any]:
        self._validate(images)
        x = images.astype(self.dtype)
        x = _conv(self.dims[0] // 2, 3, 2, "patch_embed_conv_0", self.dtype)(x)
        x = _conv(self.dims[0], 3, 2, "patch_embed_conv_1", self.dtype)(x)
        x = _layer_norm("patch_embed_norm", self.dtype)(x)
        block_cls = remat(PaCaBlock, (3, 4), self.remat_impl, self.remat_policy) if self.remat else PaCaBlock
        total, index, stages = sum(self.depths), 0, []
        for stage, depth in enumerate(self.depths):
            if stage:
                x = _conv(self.dims[stage], 3, 2, f"transition_{stage}", self.dtype)(x)
                x = _layer_norm(f"transition_{stage}_norm", self.dtype)(x)
            b, h, w, c = x.shape
            tokens, z = x.reshape(b, h * w, c), None
            for block in range(depth):
                tokens, z = block_cls(
                    dim=c,
                    heads=self.num_heads[stage],
                    num_clusters=self.clusters[stage],
                    compute_clusters=onsite_clustering(block, self.onsite[stage]),
                    mlp_ratio=self.mlp_ratios[stage],
                    clustering=self.clustering,
                    kernel=self.clustering_kernel,
                    drop_path=self.drop_path_rate * index / max(total - 1, 1),
                    attn_drop=self.attn_drop_rate,
                    drop=self.drop_rate,
                    dtype=self.dtype,
                    depthwise_impl=self.depthwise_impl,
                    name=f"stage_{stage}_block_{block}",
                )(tokens, z, (h, w), not train)
                index += 1
            x = _layer_norm(f"norm_{stage}", self.dtype)(tokens).reshape(b, h, w, c)
            stages.append(x)
        return {"stages": stages}


class PaCaViTClassifier(_PaCaFields):
    """PaCa-ViT classifier: backbone -> mean over the last stage's (normalised) tokens -> Linear."""

    num_classes: int = 1000

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        arch = {name: getattr(self, name) for name in _ARCH_FIELDS}
        feats = PaCaViTBackbone(**arch, name="backbone")(images, train)
        pooled = jnp.mean(feats["stages"][-1], axis=(1, 2))
        return _dense(self.num_classes, "head", self.dtype)(pooled).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------
# Segmentation head (upstream ``segmentation/``: multi-scale fusion, then patch-to-cluster attention).


class ConvBNReLU(nn.Module):
    """mmcv ConvModule(1x1, BN, ReLU): a bias-free 1x1 conv, BatchNorm (eps 1e-5, torch momentum 0.1)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(self.features, use_bias=False, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


class PaCaSegHead(nn.Module):
    """PaCa decode head: 4 NHWC maps -> {'logits', 'cluster_logits'}, both (B, H0, W0, num_classes).

    Each map: 1x1 ConvBNReLU to ``channels`` -> bilinear resize to the first map's size; concat (4*channels).
    Queries: ConvBNReLU. Clusters: ConvBNReLU -> 1x1 conv to num_classes (``cluster_logits``), softmax over
    pixels; cluster tokens z = c @ x. Keys/values: Linear -> BatchNorm over channels -> ReLU.
    Attention softmax(q k^T) over clusters, unscaled, one head -> proj ConvBNReLU -> Dropout2d -> 1x1 conv.
    """

    num_classes: int
    channels: int = 256
    dropout: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool = False) -> Dict[str, jax.Array]:
        b, h, w, _ = features[0].shape
        outs = []
        for i, feat in enumerate(features):
            y = ConvBNReLU(self.channels, self.dtype, name=f"convs_{i}")(feat, train)
            if y.shape[1:3] != (h, w):
                y = jax.image.resize(y, (b, h, w, self.channels), "bilinear", antialias=False)
            outs.append(y)
        x = jnp.concatenate(outs, axis=-1)
        q = ConvBNReLU(self.channels, self.dtype, name="q")(x, train).reshape(b, h * w, self.channels)
        hidden = ConvBNReLU(self.channels, self.dtype, name="clustering_0")(x, train)
        cluster_logits = nn.Dense(self.num_classes, dtype=self.dtype, name="clustering_1")(hidden)
        c = jax.nn.softmax(cluster_logits.reshape(b, h * w, -1).astype(jnp.float32), axis=1)  # over pixels
        z = jnp.einsum("bnm,bnc->bmc", c.astype(x.dtype), x.reshape(b, h * w, -1))

        def key_value(name: str) -> jax.Array:
            t = nn.Dense(self.channels, dtype=self.dtype, name=f"{name}_linear")(z)
            t = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=f"{name}_bn"
            )(t)
            return nn.relu(t)

        k, v = key_value("k"), key_value("v")
        attn = jax.nn.softmax(jnp.einsum("bnc,bmc->bnm", q, k, preferred_element_type=jnp.float32), axis=-1)
        out = jnp.einsum("bnm,bmc->bnc", attn.astype(v.dtype), v).reshape(b, h, w, self.channels)
        out = ConvBNReLU(self.channels, self.dtype, name="proj")(out, train)
        out = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(out, not train)  # Dropout2d: whole channels
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="conv_seg")(out)
        return {"logits": logits.astype(jnp.float32), "cluster_logits": cluster_logits.astype(jnp.float32)}


class PaCaViTSegmenter(_PaCaFields):
    """PaCa-ViT backbone + PaCa head; logits bilinearly resized to the input size, (B, H, W, classes).

    Upstream fine-tunes with ``clusters=(200, 200, 200, 0)`` (``downstream_cluster_num``).
    """

    num_classes: int = 150
    head_channels: int = 256
    head_dropout: float = 0.1

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, jax.Array]:
        arch = {name: getattr(self, name) for name in _ARCH_FIELDS}
        feats = PaCaViTBackbone(**arch, name="backbone")(images, train)
        out = PaCaSegHead(self.num_classes, self.head_channels, self.head_dropout, self.dtype, name="decode_head")(
            feats["stages"], train
        )
        b, h, w, _ = images.shape
        out["logits"] = jax.image.resize(out["logits"], (b, h, w, self.num_classes), "bilinear", antialias=False)
        return out


def paca_seg_loss(
    outputs: Dict[str, jax.Array], labels: jax.Array, ignore_index: int = 255, aux_weight: float = 0.4
) -> jax.Array:
    """Mean CE over non-ignored pixels of the logits plus ``aux_weight`` x the same CE of the cluster logits.

    ``labels`` (B, H, W) int; both logit maps are bilinearly resized to the label size first.
    """
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)

    def ce(logits: jax.Array) -> jax.Array:
        b, h, w = labels.shape
        logits = jax.image.resize(logits, (b, h, w, logits.shape[-1]), "bilinear", antialias=False)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), safe[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    return ce(outputs["logits"]) + aux_weight * ce(outputs["cluster_logits"])


# ---------------------------------------------------------------------------------------------------
# Published configurations (upstream registered names; short aliases paca_*).

_SMALL = dict(depths=(3, 3, 10, 3))
PRESETS: Dict[str, Dict[str, Any]] = {
    "pacavit_tiny_p2cconv_100_0": dict(depths=(2, 2, 4, 2), drop_path_rate=0.1),
    "pacavit_small_p2cconv_100_0": dict(_SMALL),
    "pacavit_base_p2cconv_100_0": dict(depths=(3, 3, 18, 3), dims=(96, 192, 384, 512), drop_path_rate=0.5),
    "pacavit_small_p2cmlp_100_0": dict(_SMALL, clustering="mlp"),
    "pacavit_small_p2cconv_2_0": dict(_SMALL, clusters=(2, 2, 2, 0)),
    "pacavit_small_p2cconv_49_0": dict(_SMALL, clusters=(49, 49, 49, 0)),
    "pacavit_small_p2cconv_49_100": dict(_SMALL, clusters=(49, 64, 81, 100)),
    "pacavit_small_p2cconv_100_49": dict(_SMALL, clusters=(100, 81, 64, 49)),
    "pacavit_small_p2cconv_100": dict(_SMALL, clusters=(100, 100, 100, 100)),
    "pacavit_small_p2cconv_100_blockwise": dict(_SMALL, clusters=(100, 100, 100, 100), onsite=(1, 1, 1, 1)),
}
ALIASES = {
    "paca_tiny": "pacavit_tiny_p2cconv_100_0",
    "paca_small": "pacavit_small_p2cconv_100_0",
    "paca_base": "pacavit_base_p2cconv_100_0",
}
PRESETS.update({alias: PRESETS[name] for alias, name in ALIASES.items()})
