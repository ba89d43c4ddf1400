"""Bipartite matching of predictions (queries) to ground-truth targets, on device inside jit.

DETR and Mask2Former match on the host with scipy's ``linear_sum_assignment``, a device-to-host round trip
every step. Here the kept library's JAX-native Hungarian solver (``optax.assignment.hungarian_algorithm``,
a Scenic-derived O(n^3) solver of ``lax`` loops) runs vmapped over the batch, so matching stays in the jitted
train step and needs no host synchronisation.

Targets come padded to a static M with a ``valid`` mask. The solver always returns min(Q, M) pairs, so the
padding is handled through the costs: every invalid column gets one constant cost above every real one.
When Q >= M every column is matched, so a constant on the invalid columns adds the same amount to every
assignment and cannot change which queries the real targets get. When M > Q, a query paired with an invalid
column could swap to an unused real column and lower the total, so the optimum uses as many real targets as
it can (min(Q, #valid)), and among those it minimises their summed cost. Non-finite costs (NaN from a
diverging model, +-inf) are replaced by a finite cost above all finite real ones and below the padding cost,
so the solver's potentials stay finite and such pairs are chosen only when nothing else is left.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _sanitise(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """(Q, M) cost, (M,) valid -> finite cost with invalid columns at a constant above every real cost."""
    finite = jnp.isfinite(cost)
    real = finite & valid[None, :]
    hi = jnp.max(jnp.where(real, cost, -jnp.inf))
    lo = jnp.min(jnp.where(real, cost, jnp.inf))
    any_real = jnp.any(real)
    hi = jnp.where(any_real, hi, 0.0)
    lo = jnp.where(any_real, lo, 0.0)
    span = hi - lo + 1.0
    cost = jnp.where(finite, cost, hi + span)
    return jnp.where(valid[None, :], cost, hi + 2.0 * span)


def _match_one(cost: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One image: (Q, M), (M,) -> (query index per target (M,), matched (M,))."""
    num_targets = cost.shape[1]
    rows, cols = optax.assignment.hungarian_algorithm(_sanitise(cost.astype(jnp.float32), valid))
    # min(Q, M) pairs (row = query, col = target); scatter them onto the target axis. Targets left without
    # a query (M > Q) keep index 0 and matched False.
    query_index = jnp.zeros((num_targets,), jnp.int32).at[cols].set(rows.astype(jnp.int32))
    paired = jnp.zeros((num_targets,), bool).at[cols].set(True)
    return query_index, paired & valid


def hungarian_match(cost: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Minimum-cost one-to-one assignment of targets to queries, per image, on device.

    Args:
      cost: float (B, Q, M) cost of predicting target m with query q. Gradients are stopped.
      valid: bool (B, M) True for real targets, False for padded slots.

    Returns:
      query_index: int32 (B, M) the query matched to each target (0 where ``matched`` is False).
      matched: bool (B, M) True for real targets that received a query; False for padded slots, and for
        the real targets left over when an image has more real targets than queries.

    Jittable on its own; the result equals scipy's ``linear_sum_assignment`` on the real columns in total
    cost (ties may be broken differently).
    """
    cost = jax.lax.stop_gradient(cost)
    return jax.vmap(_match_one)(cost, valid)
