"""GroupMixFormer backbone and classifier (Group-Mix Attention; upstream github.com/AILab-CVC/GroupMixFormer).

Layout: activations are NHWC maps ``(B, H, W, C)``; a block's tokens are the ``H*W`` positions of the map in
row-major order, which is the order the PyTorch code gets from ``flatten(2).transpose(1, 2)``.

Stem: two conv k3 s2 (explicit padding 1) -> BatchNorm -> Hardswish. Each of the four stages starts with a
patch embedding (separable conv k3, stride 1 in stage 0 and 2 afterwards -> BatchNorm -> Hardswish) and then
runs ``GMABlock``s: depthwise-conv position encoding with identity, pre-norm Group-Mix Attention and a pre-norm
MLP, each behind stochastic depth. The classifier normalises the last map with BatchNorm, averages it over
space and applies a linear head.

Group-Mix Attention splits q, k and v (stacked along the batch axis, so the aggregators share weights) into
five channel segments: an identity segment and separable-conv k3/k5/k7 "group proxies" (each followed by
BatchNorm and Hardswish) feed a CoaT-style factorised attention with a convolutional relative position term;
the fifth segment of q|k|v goes through a separable conv, LayerNorm and Hardswish and bypasses attention.

Hardswish is ``jax.nn.hard_swish`` (x * relu6(x + 3) / 6, as PyTorch) and GELU the exact erf form.
BatchNorm lives in the ``batch_stats`` collection: ``train=True`` normalises with batch statistics and
updates the running averages (call ``apply`` with ``mutable=['batch_stats']``); ``train=False`` uses them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models.layers import DepthwiseConv, DropPath, Mlp, conv, torch_default_kernel_init
from clusterformer_jax.models.remat import remat

Dtype = Any

NUM_HEADS = 8  # fixed by the relative-position split below (2 + 3 + 3 heads)
SEGMENTS = 5  # identity, k3, k5, k7 proxies + the non-attention branch
PROXY_KERNELS = (3, 5, 7)  # aggregator kernels of segments 1..3
CRPE_SPLIT = ((3, 2), (5, 3), (7, 3))  # (kernel, heads) of the convolutional relative position term


def batch_norm(name: str, train: bool, dtype: Dtype) -> nn.BatchNorm:
    """BatchNorm2d over the channel axis: PyTorch eps 1e-5 and momentum 0.1 (Flax momentum 0.9).

    Unlike PyTorch, Flax folds the biased batch variance into the running variance (a factor n/(n-1),
    n = B*H*W values per channel); normalisation itself is identical in both modes.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        use_fast_variance=False,
        name=name,
    )


def layer_norm(name: str, epsilon: float, dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, use_fast_variance=False, name=name)


def linear(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    """nn.Linear with the model's init: trunc-normal(0.02) weight, zero bias."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, kernel_init=nn.initializers.truncated_normal(0.02), name=name
    )


def depthwise_conv(kernel: int, stride: int, use_bias: bool, name: str, dtype: Dtype, impl: str) -> nn.Module:
    """Depthwise k x k conv with symmetric padding k//2 (PyTorch ``groups=channels``) and default init."""
    return DepthwiseConv(kernel, stride, use_bias, dtype, impl=impl, name=name)


class SeparableConv(nn.Module):
    """Depthwise k x k conv (``conv1``) then a 1x1 conv (``pointwise_conv``), both without bias."""

    features: int
    kernel: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = depthwise_conv(self.kernel, self.stride, False, "conv1", self.dtype, self.depthwise_impl)(x)
        return nn.Conv(
            self.features,
            (1, 1),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=torch_default_kernel_init(),
            name="pointwise_conv",
        )(x)


class ConvStem(nn.Module):
    """conv k3 s2 (3 -> dim/2) -> BN -> Hardswish -> conv k3 s2 (dim/2 -> dim) -> BN -> Hardswish."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        mid = self.dim // 2
        x = conv(mid, x.shape[-1], 3, 2, 1, "proj1", self.dtype)(x)
        x = jax.nn.hard_swish(batch_norm("norm1", train, self.dtype)(x))
        x = conv(self.dim, mid, 3, 2, 1, "proj2", self.dtype)(x)
        return jax.nn.hard_swish(batch_norm("norm2", train, self.dtype)(x))


class PatchEmbed(nn.Module):
    """Separable conv k3 (stride 1 or 2, padding 1) -> BN -> Hardswish."""

    dim: int
    stride: int
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = SeparableConv(self.dim, 3, self.stride, self.dtype, self.depthwise_impl, name="proj")(x)
        return jax.nn.hard_swish(batch_norm("norm", train, self.dtype)(x))


class Agg0(nn.Module):
    """The non-attention branch: separable conv k3 (3s -> s) -> LayerNorm (eps 1e-5) -> Hardswish."""

    seg_dim: int
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = SeparableConv(self.seg_dim, 3, 1, self.dtype, self.depthwise_impl, name="conv")(x)
        return jax.nn.hard_swish(layer_norm("norm", 1e-5, self.dtype)(x))


class Aggregator(nn.Module):
    """Splits stacked q|k|v maps ``(3B, H, W, C)`` into 5 segments of ``s = C // 5`` channels.

    Returns the attention inputs ``(3B, H, W, 4s)`` (identity segment, then the k3/k5/k7 proxies) and the
    non-attention tokens ``(B, H, W, s)`` computed from the fifth segment of q, k and v together.
    """

    dim: int
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Tuple[jax.Array, jax.Array]:
        s = self.dim // SEGMENTS
        segs = [x[..., i * s : (i + 1) * s] for i in range(SEGMENTS)]
        outs = [jax.nn.hard_swish(batch_norm("norm0", train, self.dtype)(segs[0]))]
        for i, kernel in enumerate(PROXY_KERNELS, start=1):
            y = SeparableConv(s, kernel, 1, self.dtype, self.depthwise_impl, name=f"agg{i}")(segs[i])
            outs.append(jax.nn.hard_swish(batch_norm(f"norm{i}", train, self.dtype)(y)))
        three_b, h, w, _ = x.shape
        b = three_b // 3
        # (q-seg4 | k-seg4 | v-seg4) side by side on the channel axis of each image
        local = segs[4].reshape(3, b, h, w, s).transpose(1, 2, 3, 0, 4).reshape(b, h, w, 3 * s)
        local = Agg0(s, self.dtype, self.depthwise_impl, name="agg0")(local)
        return jnp.concatenate(outs, axis=-1), local


class ConvRelPosEnc(nn.Module):
    """Depthwise convs (with bias) on v: heads 0-1 k3, heads 2-4 k5, heads 5-7 k7. Maps (B, H, W, h*Ch)."""

    head_dim: int
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(self, v: jax.Array) -> jax.Array:
        outs, start = [], 0
        for n, (kernel, heads) in enumerate(CRPE_SPLIT):
            width = heads * self.head_dim
            part = v[..., start : start + width]
            outs.append(depthwise_conv(kernel, 1, True, f"conv_list_{n}", self.dtype, self.depthwise_impl)(part))
            start += width
        return jnp.concatenate(outs, axis=-1)


class GroupMixAttention(nn.Module):
    """Group-Mix Attention (``EfficientAtt`` upstream) on a map ``(B, H, W, C)``.

    q, k, v come from one Linear(C, 3C); the aggregator's attention part gives each of the 8 heads
    ``Ch = (4C/5)/8`` channels (heads 2i and 2i+1 share aggregator i). Attention is factorised:
    ``q @ (softmax_N(k)^T v)`` scaled by ``(C // 8) ** -0.5`` (the full width, as upstream), plus
    ``q * conv(v)``. The result and the non-attention tokens are concatenated and projected.
    """

    dim: int
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    drop: float = 0.0
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        b, h, w, c = *x.shape[:3], self.dim
        inner = c // SEGMENTS * (SEGMENTS - 1)
        head_dim = inner // NUM_HEADS
        qkv = linear(3 * c, "qkv", self.dtype, self.qkv_bias)(x)
        qkv = qkv.reshape(b, h, w, 3, c).transpose(3, 0, 1, 2, 4).reshape(3 * b, h, w, c)
        proxies, local = Aggregator(c, self.dtype, self.depthwise_impl, name="aggregator")(qkv, train)
        q, k, v = proxies.reshape(3, b, h * w, NUM_HEADS, head_dim)
        k = jax.nn.softmax(k.astype(jnp.float32), axis=1).astype(v.dtype)  # over tokens, per channel
        kv = jnp.einsum("bnhk,bnhv->bhkv", k, v)
        att = jnp.einsum("bnhk,bhkv->bnhv", q, kv)
        conv_v = ConvRelPosEnc(head_dim, self.dtype, self.depthwise_impl, name="crpe")(v.reshape(b, h, w, inner))
        crpe = q * conv_v.reshape(b, h * w, NUM_HEADS, head_dim)
        scale = self.qk_scale or (c // NUM_HEADS) ** -0.5
        out = (scale * att + crpe).reshape(b, h, w, inner)
        out = linear(c, "proj", self.dtype)(jnp.concatenate([out, local], axis=-1))
        return nn.Dropout(self.drop)(out, deterministic=not train)


class ConvPosEnc(nn.Module):
    """x + depthwise conv k3 (with bias) of x."""

    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x + depthwise_conv(3, 1, True, "proj", self.dtype, self.depthwise_impl)(x)


class GMABlock(nn.Module):
    """CPE -> x + DropPath(GMA(LN(x))) -> x + DropPath(MLP(LN(x))); block LayerNorms use eps 1e-6."""

    dim: int
    mlp_ratio: float
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    drop: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvPosEnc(self.dtype, self.depthwise_impl, name="cpe")(x)
        y = layer_norm("norm1", 1e-6, self.dtype)(x)
        y = GroupMixAttention(
            self.dim, self.qkv_bias, self.qk_scale, self.drop, self.dtype, self.depthwise_impl, name="att"
        )(y, train)
        x = x + DropPath(self.drop_path)(y, not train)
        y = layer_norm("norm2", 1e-6, self.dtype)(x)
        y = Mlp(int(self.dim * self.mlp_ratio), self.drop, self.dtype, name="mlp")(y, not train)
        return x + DropPath(self.drop_path)(y, not train)


def _check_dims(dims: Sequence[int], depths: Sequence[int], mlp_ratios: Sequence[float]) -> None:
    if not len(dims) == len(depths) == len(mlp_ratios) == 4:
        raise ModelConfigError("model fields dims/depths/mlp_ratios need 4 entries each")
    for dim in dims:
        if dim % SEGMENTS or (dim // SEGMENTS * (SEGMENTS - 1)) % NUM_HEADS:
            raise ModelConfigError(
                f"model dim {dim} is invalid: every entry of model.dims must be a multiple of 10 "
                "(5 equal segments, and 4/5 of the width split over 8 heads)"
            )


class GroupMixFormerBackbone(nn.Module):
    """Stem + 4 stages: images (B, H, W, 3) -> {'stages': [4 NHWC maps at strides 4, 8, 16, 32]}.

    The maps are the raw stage outputs (upstream ``return_interm_layers=True``; no extra norm). A map with
    an odd side is rounded up by the stride-2 layers (conv arithmetic); upstream requires even sides.
    """

    dims: Sequence[int] = (80, 160, 320, 320)
    depths: Sequence[int] = (2, 4, 12, 4)
    mlp_ratios: Sequence[float] = (4, 4, 4, 4)
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: bool = False
    remat_impl: str = "barrier"
    remat_policy: str = "nothing_saveable"  # remat.REMAT_POLICIES
    depthwise_impl: str = "grouped"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Dict[str, List[jax.Array]]:
        _check_dims(self.dims, self.depths, self.mlp_ratios)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ModelConfigError(f"expected NHWC RGB images, got shape {tuple(images.shape)}")
        x = ConvStem(self.dims[0], self.dtype, name="conv_stem")(images.astype(self.dtype), train)
        block_cls = remat(GMABlock, (2,), self.remat_impl, self.remat_policy) if self.remat else GMABlock
        total = sum(self.depths)
        stages, index = [], 0
        for stage, (dim, depth) in enumerate(zip(self.dims, self.depths)):
            x = PatchEmbed(dim, 2 if stage else 1, self.dtype, self.depthwise_impl, name=f"patch_embed_{stage}")(
                x, train
            )
            for block in range(depth):
                rate = self.drop_path_rate * index / max(total - 1, 1)  # linspace(0, rate, total)
                x = block_cls(
                    dim,
                    self.mlp_ratios[stage],
                    self.qkv_bias,
                    self.qk_scale,
                    self.drop_rate,
                    rate,
                    self.dtype,
                    self.depthwise_impl,
                    name=f"stage_{stage}_block_{block}",
                )(x, train)
                index += 1
            stages.append(x)
        return {"stages": stages}


class GroupMixFormer(nn.Module):
    """The classifier: backbone -> BatchNorm (``norm4``) on the last map -> spatial mean -> Linear.

    ``__call__(images, train)`` returns float32 logits (B, num_classes).
    """

    num_classes: int = 1000
    dims: Sequence[int] = (80, 160, 320, 320)
    depths: Sequence[int] = (2, 4, 12, 4)
    mlp_ratios: Sequence[float] = (4, 4, 4, 4)
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: bool = False
    remat_impl: str = "barrier"
    remat_policy: str = "nothing_saveable"  # remat.REMAT_POLICIES
    depthwise_impl: str = "grouped"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        feats = GroupMixFormerBackbone(
            dims=self.dims,
            depths=self.depths,
            mlp_ratios=self.mlp_ratios,
            qkv_bias=self.qkv_bias,
            qk_scale=self.qk_scale,
            drop_rate=self.drop_rate,
            drop_path_rate=self.drop_path_rate,
            remat=self.remat,
            remat_impl=self.remat_impl,
            remat_policy=self.remat_policy,
            depthwise_impl=self.depthwise_impl,
            dtype=self.dtype,
            name="backbone",
        )(images, train)
        x = batch_norm("norm4", train, self.dtype)(feats["stages"][-1])
        x = jnp.mean(x, axis=(1, 2))
        return linear(self.num_classes, "head", self.dtype)(x).astype(jnp.float32)


# Official configurations (configs/groupmixformer_*.yaml upstream). Heads are 8 and
# qkv_bias True everywhere. 'large' is the yaml as released ("need to adjust"): 71.8M params, not 70.3M.
PRESETS: Dict[str, Dict[str, Any]] = {
    "gmf_miny": dict(dims=(40, 80, 160, 160), depths=(3, 3, 12, 4), mlp_ratios=(4, 4, 4, 4), drop_path_rate=0.1),
    "gmf_tiny": dict(dims=(80, 160, 200, 240), depths=(4, 4, 12, 4), mlp_ratios=(4, 4, 4, 4), drop_path_rate=0.1),
    "gmf_small": dict(dims=(80, 160, 320, 320), depths=(2, 4, 12, 4), mlp_ratios=(4, 4, 4, 4), drop_path_rate=0.2),
    "gmf_base": dict(dims=(200, 240, 320, 480), depths=(8, 8, 12, 8), mlp_ratios=(2, 2, 4, 4), drop_path_rate=0.5),
    "gmf_large": dict(dims=(240, 320, 360, 480), depths=(8, 10, 30, 10), mlp_ratios=(4, 4, 2, 2), drop_path_rate=0.1),
}
