"""Layers shared by the four backbones: PyTorch-default initialisers, 1x1 and depthwise convolutions,
PyTorch's adaptive pooling, exact GELU, norms, MLP and stochastic depth.

Activations are NHWC. Everything here follows the PyTorch originals' numerics (exact erf GELU, explicit
GroupNorm epsilon and conv padding, AdaptiveAvgPool's overlapping bins) so that imported checkpoints
compute the same numbers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models.kernels import depthwise_shifted

Dtype = Any
DEPTHWISE_IMPLS = ("grouped", "shifted")


def torch_default_kernel_init() -> Callable:
    """PyTorch's default Conv/Linear weight init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable:
    """PyTorch's default bias init U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def pointwise(features: int, fan_in: int, name: str, dtype: Dtype) -> nn.Dense:
    """A 1x1 convolution (PyTorch default init) expressed as a Dense layer over the channel axis."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=torch_default_kernel_init(),
        bias_init=torch_default_bias_init(fan_in),
        name=name,
    )


class PointwiseParams(nn.Module):
    """The kernel and bias ``pointwise(features, fan_in)`` would create, returned unapplied so that several
    1x1 convolutions of one input can run as one matmul (same parameter tree as separate layers)."""

    features: int
    fan_in: int

    @nn.compact
    def __call__(self) -> Tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", torch_default_kernel_init(), (self.fan_in, self.features))
        bias = self.param("bias", torch_default_bias_init(self.fan_in), (self.features,))
        return kernel, bias


def conv(features: int, fan_in: int, kernel: int, stride: int, pad: int, name: str, dtype: Dtype) -> nn.Conv:
    """A PyTorch-initialised k x k convolution with explicit symmetric padding."""
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


class DepthwiseConv(nn.Module):
    """Depthwise k x k conv (PyTorch ``groups=channels``, symmetric padding (k-1)//2) with nn.Conv's params.

    ``impl='grouped'`` is ``conv_general_dilated`` with one group per channel (the native depthwise kernels
    of cuDNN and the TPU). ``impl='shifted'`` runs stride-1, odd-k convolutions as k*k shifted products with
    a memory-lean backward (``kernels.depthwise_shifted``), which XLA CPU runs many times faster. Same values.
    """

    kernel: int
    stride: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = torch_default_kernel_init()
    bias_init: Optional[Callable] = None  # None: PyTorch's default for fan_in = k*k
    impl: str = "grouped"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, channels, pad = self.kernel, x.shape[-1], (self.kernel - 1) // 2
        if self.impl not in DEPTHWISE_IMPLS:
            raise ModelConfigError(f"model field depthwise_impl={self.impl!r} is not one of {DEPTHWISE_IMPLS}")
        weight = self.param("kernel", self.kernel_init, (k, k, 1, channels)).astype(self.dtype)
        x = x.astype(self.dtype)
        if self.impl == "shifted" and self.stride == 1 and k % 2:
            out = depthwise_shifted(x, weight[:, :, 0])
        else:
            out = jax.lax.conv_general_dilated(
                x,
                weight,
                (self.stride,) * 2,
                ((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=channels,
            )
        if self.use_bias:
            bias_init = self.bias_init or torch_default_bias_init(k * k)
            out = out + self.param("bias", bias_init, (channels,)).astype(self.dtype)
        return out


def adaptive_pool_bins(in_size: int, out_size: int) -> list[tuple[int, int]]:
    """Half-open input ranges of PyTorch's AdaptiveAvgPool: bin i is [floor(i*I/O), ceil((i+1)*I/O))."""
    return [((i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)) for i in range(out_size)]


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) matrix whose row i averages bin i; pooling is then a matmul per axis."""
    mat = np.zeros((out_size, in_size), np.float32)
    for i, (start, stop) in enumerate(adaptive_pool_bins(in_size, out_size)):
        mat[i, start:stop] = 1.0 / (stop - start)
    return mat


@functools.lru_cache(maxsize=None)
def adaptive_pool_token_matrix(in_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> np.ndarray:
    """(out_h*out_w, in_h*in_w) matrix pooling row-major tokens: one matmul instead of two per axis."""
    return np.kron(adaptive_pool_matrix(in_hw[0], out_hw[0]), adaptive_pool_matrix(in_hw[1], out_hw[1]))


def adaptive_avg_pool(x: jax.Array, out_hw: Tuple[int, int]) -> jax.Array:
    """Pools (G, h, w, e) to (G, out_h, out_w, e) exactly as torch.nn.AdaptiveAvgPool2d does."""
    ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], out_hw[0]), x.dtype)
    pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], out_hw[1]), x.dtype)
    return jnp.einsum("ih,jw,ghwe->gije", ph, pw, x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch's CPU kernel computes it: 0.5 x (1 + erf(x / sqrt(2))).

    Within 1e-6 of ``nn.gelu(approximate=False)`` (which uses erfc) and faster on XLA CPU.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1.0 / math.sqrt(2.0), x.dtype)))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize: x / max(||x||, eps).

    Written as x * rsqrt(max(||x||^2, eps^2)): the same value, but a finite gradient for an all-zero
    vector (a center no token selects once the softmax over K underflows), where sqrt's is NaN.
    """
    squared = jnp.sum(jnp.square(x), axis=axis)  # without keepdims: a TPU tiles a size-1 minor axis to 128
    return x * jnp.expand_dims(jax.lax.rsqrt(jnp.maximum(squared, eps * eps)), axis)


def first_argmax(x: jax.Array, axis: int) -> jax.Array:
    """``jnp.argmax`` (first index among equal maxima) as two plain reductions, which XLA CPU vectorises;
    its single (value, index) reduction does not. A NaN row gives the last index instead of the NaN's."""
    size = x.shape[axis]
    reversed_index = size - 1 - jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    at_max = x == jnp.max(x, axis=axis, keepdims=True)
    return size - 1 - jnp.max(jnp.where(at_max, reversed_index, 0), axis=axis)


def position_channels(images: jax.Array) -> jax.Array:
    """Appends row/(H-1)-0.5 and col/(W-1)-0.5 coordinate channels to NHWC images."""
    b, h, w, _ = images.shape
    rows = jnp.arange(h, dtype=images.dtype) / max(h - 1, 1) - 0.5
    cols = jnp.arange(w, dtype=images.dtype) / max(w - 1, 1) - 0.5
    grid = jnp.stack(jnp.meshgrid(rows, cols, indexing="ij"), axis=-1)
    return jnp.concatenate([images, jnp.broadcast_to(grid, (b, h, w, 2))], axis=-1)


class GroupNorm1(nn.Module):
    """GroupNorm(1, C): normalises NHWC ``x`` over (H, W, C) per sample (statistics in float32), then a
    per-channel scale and bias. The same parameters ('scale', 'bias') and values as ``nn.GroupNorm(1)``,
    computed without its (..., groups, C / groups) reshape, whose size-1 group axis a TPU tiles as 8 rows
    (8x the activation's memory in what the backward pass keeps)."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        axes = tuple(range(1, x.ndim))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=axes, keepdims=True)
        var = jnp.maximum(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) - jnp.square(mean), 0.0)
        mul = jax.lax.rsqrt(var + self.epsilon) * scale
        return ((x32 - mean) * mul + bias).astype(self.dtype)


NORM_IMPLS = ("ungrouped", "grouped")


def group_norm(name: str, dtype: Dtype, impl: str = "ungrouped") -> nn.Module:
    """GroupNorm(1, C) with PyTorch's epsilon: normalises over (H, W, C) per sample. ``impl`` (an execution
    setting, same parameters): 'ungrouped' is ``GroupNorm1`` (for TPUs); 'grouped' is flax's
    ``nn.GroupNorm(1)``, whose train step XLA's CPU backend runs ~10% faster on CF-T."""
    if impl == "grouped":
        return nn.GroupNorm(num_groups=1, epsilon=1e-5, dtype=dtype, name=name)
    if impl != "ungrouped":
        raise ModelConfigError(f"model field norm_impl={impl!r} is not one of {NORM_IMPLS}")
    return GroupNorm1(epsilon=1e-5, dtype=dtype, name=name)


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
