"""Feature dispatching (paper §3.2, Eq. 6): the clustered centers sent back to the tokens.

Two forms: the paper's Eq. 6 (every token receives the similarity-weighted mean of all centers) and the
released code's hard dispatch (every token receives the aggregate of the one center it is most similar to).
Both measure similarity as sigmoid(beta + alpha * cos(center, token)) with learnable scalars alpha, beta.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clusterformer_jax.models.kernels import affine_sigmoid
from clusterformer_jax.models.layers import first_argmax


def similarity_dispatch(
    token_dirs: jax.Array, center_dirs: jax.Array, centers: jax.Array, alpha: jax.Array, beta: jax.Array
) -> jax.Array:
    """Eq. 6 before its MLP: p_i' = (1/K) sum_k sim(C_k, p_i) C_k.

    ``token_dirs`` (G, N, e) and ``center_dirs`` (G, K, e) are unit vectors, ``centers`` (G, K, e) the
    updated centers. Returns (G, N, e).
    """
    cos = jnp.einsum("gne,gke->gnk", token_dirs, center_dirs)
    sim = affine_sigmoid(cos, alpha, beta)  # (G, N, K)
    return jnp.einsum("gnk,gke->gne", sim.astype(centers.dtype), centers) / centers.shape[1]


DISPATCH_IMPLS = ("scatter", "onehot")


def hard_dispatch(
    token_dirs: jax.Array,
    center_dirs: jax.Array,
    alpha: jax.Array,
    beta: jax.Array,
    values: jax.Array,
    center_values: jax.Array,
    impl: str = "scatter",
) -> jax.Array:
    """The released dispatch: every token takes its most similar center (first index on ties).

    Per group, with s_n = sigmoid(beta + alpha cos(C_k, p_n)) at the chosen k = a(n):
      agg_k = (C^v_k + sum_{n: a(n)=k} s_n v_n) / (1 + |{n: a(n)=k}|),   out_n = s_n agg_{a(n)}.
    ``token_dirs`` are channel-first unit vectors (G, e, N), ``center_dirs`` unit vectors (G, K, e); ``values``
    (G, N, e) and ``center_values`` (G, K, e) are in the M-step layout. Returns (G, N, e), float32.

    ``impl`` (an execution setting, same numbers): 'scatter' reads and sums through (G, N) gathers and
    scatters, so only the argmax needs a (G, K, N) array; 'onehot' is the released dense form (a one-hot
    (G, K, N) mask in three matmuls), for the TPU, whose scatters cost bytes growing faster than the batch
    (one CF-T stage-1 dispatch with its gradient for a v5e chip: 9.3 GB accessed at 16 images, 183 GB at 32;
    one-hot: 2.5 and 5.1 GB; benchmarks/dispatch_forms.py).
    """
    g, k = center_dirs.shape[:2]
    cos = jnp.einsum("gke,gen->gkn", jax.lax.stop_gradient(center_dirs), jax.lax.stop_gradient(token_dirs))
    choice = first_argmax(jax.nn.sigmoid(beta + alpha * cos), axis=1)  # (G, N)
    if impl == "onehot":
        mask = jax.nn.one_hot(choice, k, axis=1, dtype=jnp.float32)  # (G, K, N)
        chosen_dirs = jnp.einsum("gke,gkn->gen", center_dirs, mask)
    else:
        chosen_dirs = jnp.take_along_axis(jnp.swapaxes(center_dirs, 1, 2), choice[:, None, :], axis=2)
    # the chosen similarity, recomputed from the chosen center: its gradient stays (G, N, e)-sized
    sim = jax.nn.sigmoid(beta + alpha * jnp.sum(token_dirs * chosen_dirs, axis=1))[..., None]
    if impl == "onehot":
        agg = center_values + jnp.einsum("gkn,gne->gke", mask, sim * values.astype(jnp.float32))
        mean = agg / (jnp.sum(mask, axis=2)[..., None] + 1.0)
        return sim * jnp.einsum("gkn,gke->gne", mask, mean)
    groups = jnp.arange(g)[:, None]
    agg = center_values.at[groups, choice].add(sim * values.astype(jnp.float32))
    count = jnp.zeros((g, k), jnp.float32).at[groups, choice].add(1.0)
    return sim * jnp.take_along_axis(agg / (count[..., None] + 1.0), choice[..., None], axis=1)


def confidence_dispatch(
    token_dirs: jax.Array, center_dirs: jax.Array, centers: jax.Array, alpha: jax.Array
) -> jax.Array:
    """Table 6e's confidence-based dispatch: every token receives its most similar center, weighted by the
    confidence of that choice, p_n' = max_k softmax_k(alpha cos(C_k, p_n)) C_{a(n)}, a(n) = argmax_k cos.

    ``token_dirs`` (G, N, e) and ``center_dirs`` (G, K, e) are unit vectors, ``centers`` (G, K, e). Returns (G, N, e).
    """
    prob = jax.nn.softmax(alpha * jnp.einsum("gne,gke->gnk", token_dirs, center_dirs), axis=2)
    choice = first_argmax(prob, axis=2)  # (G, N)
    confidence = jnp.take_along_axis(prob, choice[..., None], axis=2)
    return confidence * jnp.take_along_axis(centers, choice[..., None], axis=1)
