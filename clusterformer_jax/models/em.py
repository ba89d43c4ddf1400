"""Recurrent cross-attention as EM (paper §3.2, Eq. 3-4), written once for the encoder's clustering mixer
(``clustering.EMStep``) and the dense cluster decoder (``decoder.ClusterEMStep``):

    E-step:  M = softmax(scale * C K^T + prior)     over the centers of each token ('clusters', Eq. 3)
                                                     or over the tokens of each center ('tokens')
    M-step:  C = M V                                 ('sum', Eq. 3) or M V / sum_n M ('mean')

Centers (..., K, e), tokens (..., N, e), assignments (..., K, N); softmax and sums in float32. ``em_scan``
runs T steps as one ``nn.scan`` that broadcasts one set of weights to every step (the recursion shares its
parameters, Eq. 3); with ``remat`` the backward pass recomputes each step from its input centers, so the T
(..., K, N) assignments are never stored (the fused ``kernels.soft_assign_sum`` does the same for Eq. 3).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

ESTEP_AXES = ("clusters", "tokens")


def e_step(
    centers: jax.Array,
    keys: jax.Array,
    axis: str = "clusters",
    scale: float = 1.0,
    valid: Optional[jax.Array] = None,
    prior: Optional[jax.Array] = None,
) -> jax.Array:
    """The assignment M (..., K, N), float32. ``valid`` (..., N) bool zeroes the columns of tokens outside the
    image; ``prior`` (..., K, N) is added to the logits (broadcast over leading axes it lacks)."""
    logits = jnp.einsum("...ke,...ne->...kn", centers, keys, preferred_element_type=jnp.float32)
    if scale != 1.0:
        logits = logits * scale
    if prior is not None:
        logits = logits + prior.astype(jnp.float32)
    assign = jax.nn.softmax(logits, axis=-2 if axis == "clusters" else -1)
    return assign if valid is None else jnp.where(valid[..., None, :], assign, 0.0)


def m_step(assign: jax.Array, values: jax.Array, mean: bool = False, eps: float = 1e-6) -> jax.Array:
    """The new centers (..., K, e) float32: the assignment-weighted sum of the values, or with ``mean`` their
    weighted mean (divided by each center's assignment mass)."""
    total = jnp.einsum("...kn,...ne->...ke", assign, values.astype(jnp.float32))
    return total / jnp.maximum(jnp.sum(assign, axis=-1, keepdims=True), eps) if mean else total


def em_scan(step: type[nn.Module], num_iters: int, num_broadcast: int, remat: bool, unroll: int, **kwargs) -> nn.Module:
    """``num_iters`` applications of module ``step`` (called as ``step(centers, *broadcast) -> (centers, None)``)
    as one ``nn.scan`` with shared weights; ``num_broadcast`` inputs are the same for every step. Assignments
    sown into 'intermediates' are stacked over the steps."""
    scanned = nn.scan(
        nn.remat(step, prevent_cse=False) if remat else step,
        variable_broadcast="params",
        variable_axes={"intermediates": 0},
        split_rngs={"params": False},
        in_axes=(nn.broadcast,) * num_broadcast,
        length=num_iters,
        unroll=unroll,
    )
    return scanned(**kwargs)
