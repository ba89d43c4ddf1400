"""The clustering token mixer of ClusterFormer: center init, recurrent EM cross-attention, dispatch.

One module covers the paper (Eq. 3, 5, 6) and the released PyTorch code (commit 0c384d2 and the later
"flash attention" commit) through config fields; see ``ClusteringMixer``.

Tensor conventions. Activations are NHWC. Inside the mixer every (image, head, window) triple is a
*group*; group tensors are ``(G, N, e)``: G groups, N = n*n tokens (or K centers), e = head_dim channels,
in "proper" order (token-major, channels last).

The released code works in NCHW and moves between channel-first ``(G, e, n, n)`` buffers and token-major
``(G, N, e)`` views with raw C-order reshapes instead of transposes (seed_systems.md §2.4). With
``partition='raw'`` those reshapes are reproduced exactly by ``_scramble`` / ``_unscramble`` and by a raw
window split, so an imported checkpoint computes the same numbers as the original. With
``partition='spatial'`` windows are true spatial windows and no scrambling happens (the paper's design).
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
from clusterformer_jax.runtime import host_allocator

Dtype = Any


ESTEP_AXES = ("clusters", "tokens")
MSTEPS = ("sum", "mean")
DISPATCHES = ("official", "paper")
PARTITIONS = ("raw", "spatial")


# ---------------------------------------------------------------------------------------------------
# Initialisers matching PyTorch defaults (only matter when training from scratch).


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


def _shifted_sum(x: jax.Array, weight: jax.Array) -> jax.Array:
    """Stride-1 'same' depthwise correlation of NHWC ``x`` with a (k, k, C) kernel, k odd, as k*k shifted products."""
    k, (height, width), pad = weight.shape[0], x.shape[1:3], (weight.shape[0] - 1) // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return sum(padded[:, i : i + height, j : j + width, :] * weight[i, j] for i in range(k) for j in range(k))


@jax.custom_vjp
def depthwise_shifted(x: jax.Array, weight: jax.Array) -> jax.Array:
    """``_shifted_sum`` with a backward that keeps only ``x`` and never holds more than k shifted copies.

    Autodiff's backward computed the k*k kernel-gradient products side by side before reducing them
    (GroupMixFormer-B's CPU train step asked for a 29.7 GB buffer at batch 8). Here the input gradient is the
    same shifted sum with the kernel flipped, and the kernel gradient a scan over kernel rows: one padded row
    band of ``x`` at a time, its k column shifts multiplied by the output gradient and reduced.
    """
    return _shifted_sum(x, weight)


def _depthwise_shifted_fwd(x, weight):
    return _shifted_sum(x, weight), (x, weight)


def _depthwise_shifted_bwd(residuals, grad):
    x, weight = residuals
    k, (batch, height, width, channels), pad = weight.shape[0], x.shape, (weight.shape[0] - 1) // 2
    grad_x = _shifted_sum(grad, weight[::-1, ::-1])
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def kernel_row(_, i):
        band = jax.lax.dynamic_slice(padded, (0, i, 0, 0), (batch, height, width + 2 * pad, channels))
        return None, jnp.stack(
            [jnp.sum(band[:, :, j : j + width] * grad, axis=(0, 1, 2), dtype=jnp.float32) for j in range(k)]
        )

    grad_weight = jax.lax.scan(kernel_row, None, jnp.arange(k))[1]
    return grad_x, grad_weight.astype(weight.dtype)


depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


class DepthwiseConv(nn.Module):
    """Depthwise k x k conv (PyTorch ``groups=channels``, symmetric padding (k-1)//2); nn.Conv's params.

    Stride 1 runs as a sum of k*k shifted products, which XLA fuses into one loop: on CPU that is 30-50x
    faster than its grouped ``conv_general_dilated`` forward, and with ``depthwise_shifted``'s backward about
    6x faster forward + backward (8x56x56x192, k = 3 and 7; same numbers). A 7x7 kernel is 49 slices; with this
    backward GroupMixFormer's CPU train steps compile in 32 s (M) to 78 s (B) at batch 8. ``impl=None`` takes the
    shifted sums on CPU only and the grouped convolution (the native depthwise kernels of cuDNN and the TPU)
    on other backends.
    """

    kernel: int
    stride: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = torch_default_kernel_init()
    bias_init: Optional[Callable] = None  # None: PyTorch's default for fan_in = k*k
    impl: Optional[str] = None  # 'shifted' | 'grouped'; None: 'shifted' on CPU, else 'grouped'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, channels, pad = self.kernel, x.shape[-1], (self.kernel - 1) // 2
        impl = self.impl or ("shifted" if jax.default_backend() == "cpu" else "grouped")
        if impl not in ("shifted", "grouped"):
            raise ModelConfigError(f"DepthwiseConv impl={impl!r} is not one of ('shifted', 'grouped')")
        weight = self.param("kernel", self.kernel_init, (k, k, 1, channels)).astype(self.dtype)
        x = x.astype(self.dtype)
        if impl == "shifted" and self.stride == 1 and k % 2:
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


# ---------------------------------------------------------------------------------------------------
# Adaptive average pooling with PyTorch's (possibly overlapping) bins.


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


# ---------------------------------------------------------------------------------------------------
# Layout helpers.


def _scramble(t: jax.Array) -> jax.Array:
    """Proper (G, L, e) -> the (G, L, e) view the released code gets by raw-reshaping (G, e, L)."""
    g, l, e = t.shape
    return jnp.swapaxes(t, 1, 2).reshape(g, l, e)


def _unscramble(t: jax.Array) -> jax.Array:
    """Inverse of ``_scramble``: raw (G, L, e) view -> proper (G, L, e)."""
    g, l, e = t.shape
    return jnp.swapaxes(t.reshape(g, e, l), 1, 2)


def _flash_regroup(t: jax.Array, heads: int) -> jax.Array:
    """The flash commit raw-reshapes (G, L, e) to (G/h, L, h, e) and attends per (G/h, h) slice."""
    g, l, e = t.shape
    return t.reshape(g // heads, l, heads, e).transpose(0, 2, 1, 3).reshape(g, l, e)


def _flash_ungroup(t: jax.Array, heads: int) -> jax.Array:
    g, l, e = t.shape
    return t.reshape(g // heads, heads, l, e).transpose(0, 2, 1, 3).reshape(g, l, e)


def window_partition(x: jax.Array, heads: int, windows: int, partition: str) -> jax.Array:
    """(B, H, W, heads*e) -> (B*heads*windows**2, n, n, e) with n = H / windows.

    ``spatial`` cuts true n x n windows. ``raw`` reproduces the released code: per (image, head) the
    channel-first (e, H, W) buffer is cut into ``windows**2`` contiguous chunks, each read as (e, n, n).
    """
    b, h, w, c = x.shape
    e = c // heads
    n_h, n_w = h // windows, w // windows
    if partition == "spatial":
        x = x.reshape(b, windows, n_h, windows, n_w, heads, e)
        x = x.transpose(0, 5, 1, 3, 2, 4, 6)
        return x.reshape(b * heads * windows * windows, n_h, n_w, e)
    return raw_chunks(x, heads, windows).transpose(0, 2, 1).reshape(-1, n_h, n_w, e)


def raw_chunks(x: jax.Array, heads: int, windows: int) -> jax.Array:
    """(B, H, W, heads*e) -> the released code's windows, channel-first: (B*heads*windows**2, e, N).

    Per (image, head) the channel-first (e, H, W) buffer is cut into ``windows**2`` contiguous chunks of
    e*N values (N = H*W / windows**2), each read as (e, N).
    """
    b, h, w, c = x.shape
    e = c // heads
    x = x.reshape(b, h, w, heads, e).transpose(0, 3, 4, 1, 2)  # (B, heads, e, H, W)
    return x.reshape(b * heads * windows * windows, e, h * w // (windows * windows))


def window_merge(x: jax.Array, batch: int, heads: int, windows: int, partition: str) -> jax.Array:
    """Inverse of ``window_partition``: (B*heads*windows**2, n, n, e) -> (B, H, W, heads*e)."""
    _, n_h, n_w, e = x.shape
    h, w = n_h * windows, n_w * windows
    if partition == "spatial":
        x = x.reshape(batch, heads, windows, windows, n_h, n_w, e)
        x = x.transpose(0, 2, 4, 3, 5, 1, 6)
        return x.reshape(batch, h, w, heads * e)
    x = x.transpose(0, 3, 1, 2).reshape(batch, heads, e, h, w)
    return x.transpose(0, 3, 4, 1, 2).reshape(batch, h, w, heads * e)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU written as PyTorch's CPU kernel computes it: 0.5 x (1 + erf(x / sqrt(2))).

    Within 1e-6 of ``nn.gelu(approximate=False)`` (which uses erfc) and about a quarter faster on XLA CPU.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1.0 / math.sqrt(2.0), x.dtype)))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize: x / max(||x||, eps).

    Written as x * rsqrt(max(||x||^2, eps^2)): the same value, but a finite gradient for an all-zero
    vector (a center no token selects once the softmax over K underflows), where sqrt's is NaN.
    """
    squared = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


# ---------------------------------------------------------------------------------------------------
# Feature dispatching (the similarity of Eq. 6 and the released hard-assignment dispatch).


@jax.custom_vjp
def affine_sigmoid(cos: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
    """sim = sigmoid(beta + alpha * cos) with scalar (shape (1,)) learnable alpha, beta.

    The custom VJP reduces the alpha/beta gradients explicitly (a flat dot product for alpha, a column
    sum then a sum for beta). Left to autodiff,
    XLA CPU rewrites the reduction of the broadcast scalars over the (G, N, K) similarity into a
    windowed tree reduction that took longer than the rest of the mixer's backward pass.
    """
    return jax.nn.sigmoid(beta + alpha * cos)


def _affine_sigmoid_fwd(cos, alpha, beta):
    sim = affine_sigmoid(cos, alpha, beta)
    return sim, (cos, alpha, sim)


def _affine_sigmoid_bwd(residuals, grad):
    cos, alpha, sim = residuals
    d_pre = grad * sim * (1.0 - sim)
    d_alpha = jnp.dot(d_pre.reshape(-1), cos.reshape(-1)).reshape(1).astype(alpha.dtype)
    d_beta = jnp.sum(d_pre.reshape(-1, d_pre.shape[-1]), axis=0).sum().reshape(1).astype(alpha.dtype)
    return (d_pre * alpha).astype(cos.dtype), d_alpha, d_beta


affine_sigmoid.defvjp(_affine_sigmoid_fwd, _affine_sigmoid_bwd)


def first_argmax(x: jax.Array, axis: int) -> jax.Array:
    """``jnp.argmax`` (first index among equal maxima) as two plain reductions, which XLA CPU vectorises;
    its single (value, index) reduction does not. A NaN row gives the last index instead of the NaN's."""
    size = x.shape[axis]
    reversed_index = size - 1 - jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    at_max = x == jnp.max(x, axis=axis, keepdims=True)
    return size - 1 - jnp.max(jnp.where(at_max, reversed_index, 0), axis=axis)


def _hard_dispatch(
    token_dirs: jax.Array,
    center_dirs: jax.Array,
    alpha: jax.Array,
    beta: jax.Array,
    values: jax.Array,
    center_values: jax.Array,
) -> jax.Array:
    """The released dispatch: every token takes its most similar center (first index on ties).

    Per group, with s_n = sigmoid(beta + alpha cos(C_k, p_n)) at the chosen k = a(n):
      agg_k = (C^v_k + sum_{n: a(n)=k} s_n v_n) / (1 + |{n: a(n)=k}|),   out_n = s_n agg_{a(n)}.
    This equals the released dense form (sim * one_hot mask, two K x N x e products), but only the
    argmax needs the (G, K, N) similarity; sums and gradients run on (G, N, e) gathers and scatters.
    ``token_dirs`` are channel-first unit vectors (G, e, N) (the layout the released windows come in,
    which makes the similarity a plain (K, e) x (e, N) product), ``center_dirs`` unit vectors (G, K, e);
    ``values`` and ``center_values`` are in the M-step layout. Returns (G, N, e) in that layout, float32.
    """
    g, k = center_dirs.shape[:2]
    cos = jnp.einsum("gke,gen->gkn", jax.lax.stop_gradient(center_dirs), jax.lax.stop_gradient(token_dirs))
    choice = first_argmax(jax.nn.sigmoid(beta + alpha * cos), axis=1)  # (G, N)
    take = lambda t: jnp.take_along_axis(t, choice[..., None], axis=1)  # noqa: E731  (G, K, e) -> (G, N, e)
    # the chosen similarity, recomputed from the chosen center: its gradient stays (G, N, e)-sized
    chosen_dirs = jnp.take_along_axis(jnp.swapaxes(center_dirs, 1, 2), choice[:, None, :], axis=2)
    sim = jax.nn.sigmoid(beta + alpha * jnp.sum(token_dirs * chosen_dirs, axis=1))[..., None]
    groups = jnp.arange(g)[:, None]
    agg = center_values.at[groups, choice].add(sim * values.astype(jnp.float32))
    count = jnp.zeros((g, k), jnp.float32).at[groups, choice].add(1.0)
    return sim * take(agg / (count[..., None] + 1.0))


# ---------------------------------------------------------------------------------------------------
# Recurrent EM cross-attention (Eq. 3).


def _assignment_logits(queries, keys, scale, transposed):
    spec = "gne,gke->gnk" if transposed else "gke,gne->gkn"
    operands = (keys, queries) if transposed else (queries, keys)
    logits = jnp.einsum(spec, *operands, preferred_element_type=jnp.float32)
    return logits if scale == 1.0 else logits * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def soft_assign_sum(queries, keys, values, over_clusters: bool, scale: float):
    """E-step then M-step of Eq. 3: C = softmax(scale Q K^T) V, the softmax over the K centers of each
    token (``over_clusters``) or over the N tokens of each center. (G, K, e), (G, N, e), (G, N, e) -> (G, K, e).

    The forward pass is what XLA fuses into one kernel. The hand-written backward pass recomputes the
    assignment transposed, (G, N, K): there the softmax reduces a minor axis for the clusters variant and
    two of its three products (dK = dL^T Q, dV = A^T dC) take both operands in their stored order, where
    autodiff's (G, K, N) assignment makes XLA CPU run both as slow transposed-operand products.
    """
    assign = jax.nn.softmax(_assignment_logits(queries, keys, scale, False), axis=1 if over_clusters else 2)
    return jnp.einsum("gkn,gne->gke", assign.astype(values.dtype), values)


def _soft_assign_sum_fwd(queries, keys, values, over_clusters, scale):
    return soft_assign_sum(queries, keys, values, over_clusters, scale), (queries, keys, values)


def _soft_assign_sum_bwd(over_clusters, scale, residuals, grad):
    queries, keys, values = residuals
    axis = 2 if over_clusters else 1  # the softmax axis in the transposed (G, N, K) assignment
    assign_t = jax.nn.softmax(_assignment_logits(queries, keys, scale, True), axis=axis)
    d_assign_t = jnp.einsum("gne,gke->gnk", values, grad, preferred_element_type=jnp.float32)
    d_logits_t = assign_t * (d_assign_t - jnp.sum(assign_t * d_assign_t, axis=axis, keepdims=True))
    if scale != 1.0:
        d_logits_t = d_logits_t * scale
    d_logits_t = d_logits_t.astype(queries.dtype)
    d_queries = jnp.einsum("gnk,gne->gke", d_logits_t, keys)
    d_keys = jnp.einsum("gnk,gke->gne", d_logits_t, queries)
    d_values = jnp.einsum("gnk,gke->gne", assign_t.astype(grad.dtype), grad).astype(values.dtype)
    return d_queries, d_keys, d_values


soft_assign_sum.defvjp(_soft_assign_sum_fwd, _soft_assign_sum_bwd)


class EMStep(nn.Module):
    """One E-step + M-step. Used as the body of an ``nn.scan`` whose parameters are broadcast.

    Carry: the centers in proper (G, K, e) layout. ``keys`` and ``values`` are already in the E-step
    layout (scrambled / regrouped when reproducing the released code).
    """

    head_dim: int
    heads: int
    estep_axis: str = "clusters"
    mstep: str = "sum"
    query_proj: bool = True
    raw_layout: bool = False
    dtype: Dtype = jnp.float32

    def _to_estep(self, c: jax.Array) -> jax.Array:
        if not self.raw_layout:
            return c
        c = _scramble(c)
        return _flash_regroup(c, self.heads) if self.estep_axis == "tokens" else c

    def _from_estep(self, c: jax.Array) -> jax.Array:
        if not self.raw_layout:
            return c
        if self.estep_axis == "tokens":
            c = _flash_ungroup(c, self.heads)
        return _unscramble(c)

    @nn.compact
    def __call__(self, centers, keys, values):
        q = centers
        if self.query_proj:
            q = pointwise(self.head_dim, self.head_dim, "conv_c", self.dtype)(q)
        q = self._to_estep(q)
        # Eq. 3 / commit 0c384d2: softmax over the K centers, no scaling; the flash commit: softmax over
        # tokens with 1/sqrt(head_dim)
        over_clusters = self.estep_axis == "clusters"
        scale = 1.0 if over_clusters else self.head_dim**-0.5
        if self.mstep == "sum":
            new = soft_assign_sum(q, keys, values, over_clusters, scale)
        else:
            assign = jax.nn.softmax(_assignment_logits(q, keys, scale, False), axis=1 if over_clusters else 2)
            new = jnp.einsum("gkn,gne->gke", assign.astype(values.dtype), values)
            mass = jnp.sum(assign, axis=2, keepdims=True)
            new = new / jnp.maximum(mass, 1e-6).astype(new.dtype)
        return self._from_estep(new), None


def resolve_em_unroll(unroll: Optional[int], num_iters: int) -> int:
    """The scan unroll factor: ``unroll`` as given (capped at T), or, for None, T (no loop) except on CPU
    without tcmalloc, where the rolled loop is faster.

    Unrolled, the T steps need no stacked carry residuals, no loop-carried copies and no while loop: the
    ClusterFormer-T CPU train step ran 1.06-1.13x faster with tcmalloc (four A/Bs). Its temporaries are a
    quarter larger (2840 against 2247 MiB at batch 8), and glibc maps and faults those pages in anew every
    step, which made the unrolled step 0.76x there.
    """
    if unroll is not None:
        if unroll < 1:
            raise ModelConfigError(f"model field em_unroll={unroll} must be >= 1 (or None for the default)")
        return min(unroll, num_iters)
    return 1 if jax.default_backend() == "cpu" and host_allocator() != "tcmalloc" else num_iters


GROUP_CHUNK_BYTES = 1 << 20  # CPU default: one chunk's (K, N) float32 assignments, sized to stay in a core's L2


def resolve_group_chunk(per_chunk: Optional[int], groups: int, heads: int, assignment_size: int) -> int:
    """Groups per chunk of the clustering loop: ``per_chunk`` as given, or, for None, all groups (no loop) on
    accelerators and on CPU the largest divisor of ``groups`` whose (K, N) assignments fit
    ``GROUP_CHUNK_BYTES``. Chunks hold whole multiples of ``heads`` groups, which the flash layout mixes.

    On CPU every EM and dispatch op otherwise streams all groups' (G, K, N) tensors (30 MB in ClusterFormer-T's
    first stage at batch 8) through memory between ops; in cache-sized chunks the whole EM runs in cache.
    The default leaves several CPU devices alone: there the group axis is the sharded batch, and a loop
    slicing it would gather every chunk onto every device.
    """
    if per_chunk is None:
        if jax.default_backend() != "cpu" or jax.device_count() > 1:
            return groups
        per_chunk = max(heads, GROUP_CHUNK_BYTES // (4 * assignment_size))
    elif per_chunk < 1:
        raise ModelConfigError(f"model field group_chunk={per_chunk} must be >= 1 (or None for the default)")
    fits = [d for d in range(heads, min(per_chunk, groups) + 1, heads) if groups % d == 0]
    return fits[-1] if fits else groups


def em_scan(num_iters: int, remat: bool = True, unroll: int = 1, **step_kwargs) -> nn.Module:
    """T EM steps as one ``nn.scan`` sharing a single set of weights across iterations.

    ``remat`` keeps only each step's input centers as scan residuals and recomputes the rest in the backward
    pass (same numbers). It matters for ``mstep='mean'``, whose (G, K, N) assignment autodiff would otherwise
    stack T times; the 'sum' E-step's own VJP recomputes its assignment either way.
    ``unroll`` steps run per loop iteration (see ``resolve_em_unroll``); any value gives the same numbers.
    """
    scanned = nn.scan(
        nn.remat(EMStep, prevent_cse=False) if remat else EMStep,
        variable_broadcast="params",
        split_rngs={"params": False},
        in_axes=(nn.broadcast, nn.broadcast),
        length=num_iters,
        unroll=unroll,
    )
    return scanned(**step_kwargs)


# ---------------------------------------------------------------------------------------------------
# The token mixer.


class ClusteringMixer(nn.Module):
    """Clustering token mixer: (B, H, W, dim) -> ((B, H, W, dim), centers (B, windows**2 * K, heads*e)).

    Fields:
      heads, head_dim: multi-head split; inner width = heads * head_dim (Table 6d ablates head_dim).
      windows: window count per side (1 = the whole map). Must divide H and W.
      centers: (kh, kw) centers per window, initialised by adaptive average pooling (K = kh*kw).
      num_iters: T, the EM iterations of one shared-weight ``nn.scan``.
      estep_axis: 'clusters' (softmax over K, no scaling, Eq. 3 / commit 0c384d2) or 'tokens'
        (softmax over tokens with 1/sqrt(head_dim), the later flash commit).
      query_proj: project centers with a shared e->e layer (``conv_c``) before each E-step.
      mstep: 'sum' (Eq. 3: C = M V) or 'mean' (divided by each center's assignment mass).
      center_ffn: apply Eq. 5's FFN to the pooled initial centers.
      dispatch: 'official' (sigmoid(alpha*cos+beta), hard argmax, count+1 normalised aggregation of
        value features) or 'paper' (Eq. 6: similarity-weighted centers / K through an MLP).
      partition: 'raw' (the released code's reshapes, for numerical parity) or 'spatial'.
      em_remat: recompute the EM assignments in the backward pass (see ``em_scan``); same numbers.
      em_unroll: EM steps per scan-loop iteration; None picks by backend and allocator
        (``resolve_em_unroll``); same numbers.
      group_chunk: groups (image x head x window) per iteration of a loop over the clustering (EM and
        dispatch); None: cache-sized chunks on one CPU device, else one pass (``resolve_group_chunk``); same numbers.
    """

    dim: int
    heads: int
    head_dim: int = 32
    windows: int = 1
    centers: Tuple[int, int] = (10, 10)
    num_iters: int = 3
    estep_axis: str = "clusters"
    query_proj: bool = True
    mstep: str = "sum"
    center_ffn: bool = False
    dispatch: str = "official"
    partition: str = "raw"
    em_remat: bool = True
    em_unroll: Optional[int] = None
    group_chunk: Optional[int] = None
    dtype: Dtype = jnp.float32

    def _check(self, h: int, w: int) -> None:
        for field, value, allowed in (
            ("estep_axis", self.estep_axis, ESTEP_AXES),
            ("mstep", self.mstep, MSTEPS),
            ("dispatch", self.dispatch, DISPATCHES),
            ("partition", self.partition, PARTITIONS),
        ):
            if value not in allowed:
                raise ModelConfigError(f"model field {field}={value!r} is not one of {allowed}")
        if self.num_iters < 1:
            raise ModelConfigError(f"model field num_iters={self.num_iters} must be >= 1")
        if h % self.windows or w % self.windows:
            raise ModelConfigError(
                f"a {h}x{w} feature map is not divisible by window count {self.windows}; "
                "choose window_counts that divide every stage's size (e.g. [8,4,2,1] for 224 inputs)"
            )

    def _cluster_groups(self, group_inputs, alpha, beta) -> Tuple[jax.Array, jax.Array]:
        """EM (Eq. 3) then dispatch for a run of groups: returns (out (G', N, e) float32, centers (G', K, e))."""
        centers, em_keys, em_values, dispatch_queries, values, center_values = group_inputs
        raw = self.partition == "raw"
        centers, _ = em_scan(
            self.num_iters,
            remat=self.em_remat,
            unroll=resolve_em_unroll(self.em_unroll, self.num_iters),
            head_dim=self.head_dim,
            heads=self.heads,
            estep_axis=self.estep_axis,
            mstep=self.mstep,
            query_proj=self.query_proj,
            raw_layout=raw,
            dtype=self.dtype,
            name="em",
        )(centers, em_keys, em_values)
        center_dirs = l2_normalize(centers.astype(jnp.float32))
        if self.dispatch == "official":
            token_dirs = l2_normalize(dispatch_queries.astype(jnp.float32), axis=1)  # channel-first (G, e, N)
            out = _hard_dispatch(token_dirs, center_dirs, alpha, beta, values, center_values.astype(jnp.float32))
            return (_unscramble(out) if raw else out), centers
        # Eq. 6: (1/K) sum_k sim(C_k, p_i) C_k (the MLP after it runs on the merged map)
        token_dirs = l2_normalize(dispatch_queries.astype(jnp.float32))
        cos = jnp.einsum("gne,gke->gnk", token_dirs, center_dirs)
        sim = affine_sigmoid(cos, alpha, beta)  # (G, N, K)
        return jnp.einsum("gnk,gke->gne", sim.astype(centers.dtype), centers) / centers.shape[1], centers

    @nn.compact
    def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
        b, h, w, _ = x.shape
        self._check(h, w)
        e, heads = self.head_dim, self.heads
        inner = heads * e
        raw = self.partition == "raw"
        windows = self.windows if self.windows > 1 else 1

        kernels, biases = zip(*(PointwiseParams(inner, self.dim, name=n)() for n in ("conv1", "conv_v", "conv_f")))
        n_h, n_w = h // windows, w // windows
        g, n = b * heads * windows * windows, n_h * n_w
        kh, kw = self.centers
        num_centers = kh * kw
        pool = jnp.asarray(adaptive_pool_token_matrix((n_h, n_w), (kh, kw)), self.dtype)  # (K, N)
        if raw:
            # conv1 / conv_v / conv_f straight into the released channel-first (B, heads*e, H*W) buffers: its
            # windows are then plain reshapes (G, e, N), keys/values raw views of them, and the scrambled
            # center values one (G*e, N) x (N, K) matmul
            tokens = x.astype(self.dtype).reshape(b, h * w, self.dim)
            q_cf, v_cf, f_cf = (
                (jnp.einsum("bnd,dc->bcn", tokens, k.astype(self.dtype)) + bias.astype(self.dtype)[:, None]).reshape(
                    g, e, n
                )
                for k, bias in zip(kernels, biases)
            )
            q_tok = jnp.swapaxes(q_cf, 1, 2)
            keys, values = v_cf.reshape(g, n, e), f_cf.reshape(g, n, e)
            center_values = jnp.einsum("gen,kn->gek", f_cf, pool).reshape(g, num_centers, e)
        else:
            # conv1 / conv_v / conv_f as one matmul, split into groups by one layout change
            qvf = jnp.dot(x.astype(self.dtype), jnp.concatenate(kernels, axis=1).astype(self.dtype))
            qvf = qvf + jnp.concatenate(biases).astype(self.dtype)
            stacked = qvf.reshape(b, h, w, 3, inner).transpose(3, 0, 1, 2, 4).reshape(3 * b, h, w, inner)
            q_tok, keys, values = window_partition(stacked, heads, windows, "spatial").reshape(3, g, n, e)
            center_values = jnp.einsum("kn,gne->gke", pool, values)
        centers = jnp.einsum("kn,gne->gke", pool, q_tok)
        if self.center_ffn:  # Eq. 5: C0 = FFN(AdaptivePool_K(I))
            hidden = nn.Dense(4 * e, dtype=self.dtype, name="center_ffn_fc1")(centers)
            centers = nn.Dense(e, dtype=self.dtype, name="center_ffn_fc2")(gelu(hidden))

        em_keys, em_values = keys, values
        if raw and self.estep_axis == "tokens":
            em_keys, em_values = _flash_regroup(keys, heads), _flash_regroup(values, heads)
        alpha = self.param("sim_alpha", nn.initializers.ones, (1,))
        beta = self.param("sim_beta", nn.initializers.zeros, (1,))
        # the (G, e, N) channel-first queries feed the official dispatch, the (G, N, e) ones Eq. 6
        dispatch_queries = (q_cf if raw else jnp.swapaxes(q_tok, 1, 2)) if self.dispatch == "official" else q_tok
        group_inputs = (centers, em_keys, em_values, dispatch_queries, values, center_values)
        per_chunk = resolve_group_chunk(self.group_chunk, g, heads, num_centers * n)
        if per_chunk == g:
            out, centers = self._cluster_groups(group_inputs, alpha, beta)
        else:
            # every group clusters independently: run them in cache-sized chunks, one loop iteration each
            def body(mdl, carry, chunk):
                return carry, mdl._cluster_groups(chunk, alpha, beta)

            chunked = tuple(t.reshape(g // per_chunk, per_chunk, *t.shape[1:]) for t in group_inputs)
            _, (out, centers) = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})(
                self, None, chunked
            )
            out, centers = out.reshape(g, *out.shape[2:]), centers.reshape(g, *centers.shape[2:])

        out = window_merge(out.astype(self.dtype).reshape(g, n_h, n_w, e), b, heads, windows, self.partition)
        if self.dispatch == "paper":
            out = gelu(pointwise(inner, inner, "dispatch_fc", self.dtype)(out))
        out = pointwise(self.dim, inner, "conv2", self.dtype)(out)

        centers_out = centers.reshape(b, heads, windows * windows * num_centers, e)
        centers_out = centers_out.transpose(0, 2, 1, 3).reshape(b, -1, inner)
        return out, centers_out
