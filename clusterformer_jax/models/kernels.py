"""Custom-VJP kernels: the same values as autodiff, with backward passes shaped for XLA CPU.

Each replaces an autodiff backward that XLA CPU ran slowly or with large temporaries; GPUs and TPUs compute
the same numbers with them. ``benchmarks/`` times them; the tests compare every one with autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _shifted_sum(x: jax.Array, weight: jax.Array) -> jax.Array:
    """Stride-1 'same' depthwise correlation of NHWC ``x`` with a (k, k, C) kernel, k odd, as k*k shifted products."""
    k, (height, width), pad = weight.shape[0], x.shape[1:3], (weight.shape[0] - 1) // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return sum(padded[:, i : i + height, j : j + width, :] * weight[i, j] for i in range(k) for j in range(k))


@jax.custom_vjp
def depthwise_shifted(x: jax.Array, weight: jax.Array) -> jax.Array:
    """``_shifted_sum`` with a backward that keeps only ``x`` and never holds more than k shifted copies.

    Autodiff computes the k*k kernel-gradient products side by side before reducing them. Here the input
    gradient is the same shifted sum with the kernel flipped, and the kernel gradient a scan over kernel
    rows: one padded row band of ``x`` at a time, its k column shifts multiplied by the output gradient.
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


@jax.custom_vjp
def affine_sigmoid(cos: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
    """sim = sigmoid(beta + alpha * cos) with scalar (shape (1,)) learnable alpha, beta.

    The backward reduces the alpha/beta gradients explicitly (a flat dot product, a column sum); autodiff's
    reduction of the broadcast scalars became a slow windowed tree reduction on XLA CPU.
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


def assignment_logits(queries: jax.Array, keys: jax.Array, scale: float, transposed: bool) -> jax.Array:
    """scale * Q K^T in float32: (G, K, N), or (G, N, K) when ``transposed``."""
    spec = "gne,gke->gnk" if transposed else "gke,gne->gkn"
    operands = (keys, queries) if transposed else (queries, keys)
    logits = jnp.einsum(spec, *operands, preferred_element_type=jnp.float32)
    return logits if scale == 1.0 else logits * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def soft_assign_sum(queries, keys, values, over_clusters: bool, scale: float):
    """E-step then M-step of Eq. 3: C = softmax(scale Q K^T) V, the softmax over the K centers of each
    token (``over_clusters``) or over the N tokens of each center. (G, K, e), (G, N, e), (G, N, e) -> (G, K, e).

    The backward recomputes the assignment transposed, (G, N, K): the softmax then reduces a minor axis and
    two of its three products take both operands in stored order, where autodiff's (G, K, N) assignment
    makes XLA CPU run them as slow transposed-operand products.
    """
    assign = jax.nn.softmax(assignment_logits(queries, keys, scale, False), axis=1 if over_clusters else 2)
    return jnp.einsum("gkn,gne->gke", assign.astype(values.dtype), values)


def _soft_assign_sum_fwd(queries, keys, values, over_clusters, scale):
    return soft_assign_sum(queries, keys, values, over_clusters, scale), (queries, keys, values)


def _soft_assign_sum_bwd(over_clusters, scale, residuals, grad):
    queries, keys, values = residuals
    axis = 2 if over_clusters else 1  # the softmax axis in the transposed (G, N, K) assignment
    assign_t = jax.nn.softmax(assignment_logits(queries, keys, scale, True), axis=axis)
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
