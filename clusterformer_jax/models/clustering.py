"""The clustering token mixer of ClusterFormer (paper §3.2): center init, recurrent EM cross-attention,
feature dispatching.

One module covers the paper (Eq. 3, 5, 6) and the released PyTorch code (github.com/ClusterFormer/
ClusterFormer, commit 0c384d2 and the later "flash attention" commit) through the fields of ``MixerConfig``.
Group layout and the released code's raw reshapes: ``layout.py``; dispatch: ``dispatch.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models.dispatch import DISPATCH_IMPLS, confidence_dispatch, hard_dispatch, similarity_dispatch
from clusterformer_jax.models.em import ESTEP_AXES, e_step, em_scan, m_step
from clusterformer_jax.models.kernels import assignment_logits, soft_assign_sum
from clusterformer_jax.models.layers import (
    PointwiseParams,
    adaptive_pool_token_matrix,
    first_argmax,
    gelu,
    l2_normalize,
    pointwise,
)
from clusterformer_jax.models.layout import (
    flash_regroup,
    flash_ungroup,
    scramble,
    unscramble,
    window_merge,
    window_partition,
)

Dtype = Any


class EMStep(nn.Module):
    """One EM iteration of recurrent cross-attention (Eq. 3, ``em.py``), the body of ``em.em_scan``:

        E-step:  M = softmax(C W_q K^T)          (softmax over the K centers of each token)
        M-step:  C <- M V

    Carry: the centers (G, K, e). ``keys``/``values``: the group's tokens (G, N, e), already in the E-step
    layout. ``estep_axis='tokens'`` is the flash commit's variant (softmax over tokens, scaled by
    1/sqrt(e)); ``mstep='mean'`` divides each center by its assignment mass. Table 6c's parameter-free
    ``update='cosine'`` takes M = softmax_K(cos(C, K)); ``update='kmeans'`` (kMaX) a hard M = one-hot
    argmax_K(C W_q K^T) and a residual C <- C + M V. With the ``intermediates`` collection mutable, M is sown
    as ``assignment`` (G, K, N). Eq. 3 itself runs as ``kernels.soft_assign_sum``, whose backward pass
    recomputes M from (C, K, V) instead of storing it.
    """

    head_dim: int
    heads: int
    estep_axis: str = "clusters"
    mstep: str = "sum"
    query_proj: bool = True
    raw_layout: bool = False
    update: str = "recurrent"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, centers, keys, values):
        projected = self.query_proj and self.update != "cosine"
        q = pointwise(self.head_dim, self.head_dim, "conv_c", self.dtype)(centers) if projected else centers
        q = self._to_estep(q)
        scale = 1.0 if self.estep_axis == "clusters" else self.head_dim**-0.5
        eq3 = self.update == "recurrent" and self.mstep == "sum"
        assign = None if eq3 else self._assignment(q, keys, scale)
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "assignment", self._assignment(q, keys, scale) if eq3 else assign)
        if eq3:
            new = soft_assign_sum(q, keys, values, self.estep_axis == "clusters", scale)
        else:
            new = m_step(assign, values, mean=self.mstep == "mean").astype(values.dtype)
            if self.update == "kmeans":
                new = self._to_estep(centers) + new
        return self._from_estep(new), None

    def _assignment(self, q, keys, scale) -> jax.Array:
        """The E-step's (G, K, N) assignment M."""
        if self.update == "cosine":
            unit = (l2_normalize(a.astype(jnp.float32)) for a in (q, keys))
            return e_step(*unit, self.estep_axis)
        if self.update == "kmeans":
            logits = assignment_logits(q, keys, scale, False)
            return jax.nn.one_hot(first_argmax(logits, axis=1), logits.shape[1], axis=1, dtype=logits.dtype)
        return e_step(q, keys, self.estep_axis, scale)

    def _to_estep(self, c: jax.Array) -> jax.Array:
        if not self.raw_layout:
            return c
        c = scramble(c)
        return flash_regroup(c, self.heads) if self.estep_axis == "tokens" else c

    def _from_estep(self, c: jax.Array) -> jax.Array:
        if not self.raw_layout:
            return c
        return unscramble(flash_ungroup(c, self.heads) if self.estep_axis == "tokens" else c)


class AttentionUpdate(nn.Module):
    """Table 6c's attention baselines for the center update: T steps of standard cross-attention from the
    centers to the tokens, each step with its own weights (not a recursion) and a residual:

        C <- C + W_o softmax_N((C W_q)(K W_k)^T / sqrt(e)) (V W_v)

    ``mask`` (K, N) restricts each center to some tokens: ``criss_cross_mask`` gives CCNet's criss-cross
    pattern. The attention is sown as ``assignment`` (G, K, N) when ``intermediates`` is mutable.
    """

    head_dim: int
    num_iters: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, centers, keys, values, mask=None):
        e = self.head_dim
        for t in range(self.num_iters):
            q, k, v = (
                pointwise(e, e, f"{n}_{t}", self.dtype)(a) for n, a in (("q", centers), ("k", keys), ("v", values))
            )
            logits = assignment_logits(q, k, e**-0.5, False)
            if mask is not None:
                logits = jnp.where(jnp.asarray(mask)[None], logits, -jnp.inf)
            attention = jax.nn.softmax(logits, axis=2)
            if self.is_mutable_collection("intermediates"):
                self.sow("intermediates", "assignment", attention)
            update = jnp.einsum("gkn,gne->gke", attention.astype(v.dtype), v)
            centers = centers + pointwise(e, e, f"o_{t}", self.dtype)(update)
        return centers


def criss_cross_mask(grid: Tuple[int, int], centers: Tuple[int, int]) -> np.ndarray:
    """(K, N) criss-cross pattern: center (i, j) of the kh x kw grid sits at token row floor((i + 1/2) n_h / kh)
    and column floor((j + 1/2) n_w / kw) of the n_h x n_w window and sees the tokens of that row and column."""
    (n_h, n_w), (k_h, k_w) = grid, centers
    rows = ((np.arange(k_h) + 0.5) * n_h / k_h).astype(int)
    cols = ((np.arange(k_w) + 0.5) * n_w / k_w).astype(int)
    token_row, token_col = np.divmod(np.arange(n_h * n_w), n_w)
    center_row, center_col = np.repeat(rows, k_w), np.tile(cols, k_h)
    return (token_row[None] == center_row[:, None]) | (token_col[None] == center_col[:, None])


MSTEPS = ("sum", "mean")
# Table 6c / 6e: every option but the first two of each runs only with partition='spatial'
CENTER_UPDATES = ("recurrent", "none", "cosine", "kmeans", "vanilla", "criss_cross")
DISPATCHES = ("official", "paper", "none", "fc", "confidence", "fc_similarity")
PARTITIONS = ("raw", "spatial")


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """The clustering mixer's options; the backbone passes one of these to every block.

    head_dim: channels per head (Table 6d). centers: (kh, kw) centers per window, initialised by adaptive
    average pooling (K = kh*kw). num_iters: T, the EM iterations of one shared-weight ``nn.scan`` (Table 6b).
    estep_axis: 'clusters' (softmax over K, no scaling: Eq. 3, commit 0c384d2) or 'tokens' (softmax over
    tokens with 1/sqrt(head_dim): the flash commit). query_proj: a shared e->e projection (``conv_c``) of the
    centers before each E-step. mstep: 'sum' (Eq. 3, C = M V) or 'mean' (divided by assignment mass).
    center_ffn: Eq. 5's FFN on the pooled initial centers. dispatch: 'official' (hard argmax) or 'paper'
    (Eq. 6). partition: 'raw' (the released code's reshapes, for parity) or 'spatial' (true windows).

    Execution fields (same numbers, only speed and memory differ; ``runtime.execution_settings`` picks them
    per machine): em_remat recomputes the EM steps in the backward pass, keeping only their input centers;
    em_unroll: EM steps per scan-loop iteration (None: all T, no loop); group_chunk: groups (image x head x
    window) per iteration of a loop over the clustering, or None; group_chunk_bytes: when group_chunk is
    None, chunks whose (K, N) float32 assignments fit this many bytes, or None for all groups at once;
    dispatch_impl: the hard dispatch's form ('scatter' or 'onehot', ``dispatch.hard_dispatch``).
    """

    head_dim: int = 32
    centers: Tuple[int, int] = (10, 10)
    num_iters: int = 3
    estep_axis: str = "clusters"
    query_proj: bool = True
    mstep: str = "sum"
    center_ffn: bool = False
    dispatch: str = "official"
    center_update: str = "recurrent"
    partition: str = "raw"
    em_remat: bool = True
    em_unroll: Optional[int] = None
    group_chunk: Optional[int] = None
    group_chunk_bytes: Optional[int] = None
    dispatch_impl: str = "scatter"

    def validate(self) -> None:
        for field, value, allowed in (
            ("estep_axis", self.estep_axis, ESTEP_AXES),
            ("mstep", self.mstep, MSTEPS),
            ("dispatch", self.dispatch, DISPATCHES),
            ("center_update", self.center_update, CENTER_UPDATES),
            ("partition", self.partition, PARTITIONS),
            ("dispatch_impl", self.dispatch_impl, DISPATCH_IMPLS),
        ):
            if value not in allowed:
                raise ModelConfigError(f"model field {field}={value!r} is not one of {allowed}")
        ablated = self.dispatch not in DISPATCHES[:2] or self.center_update not in CENTER_UPDATES[:2]
        if ablated and self.partition != "spatial":
            raise ModelConfigError(
                f"center_update={self.center_update!r} / dispatch={self.dispatch!r} need partition='spatial'"
            )
        for field in ("num_iters", "em_unroll", "group_chunk", "group_chunk_bytes"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ModelConfigError(f"model field {field}={value} must be >= 1")

    def unroll(self) -> int:
        """EM steps per scan-loop iteration."""
        return self.num_iters if self.em_unroll is None else min(self.em_unroll, self.num_iters)

    def groups_per_chunk(self, groups: int, heads: int, assignment_size: int) -> int:
        """Groups per iteration of the clustering loop (``groups``: no loop). Chunks hold whole multiples of
        ``heads`` groups, which the flash layout mixes, and divide ``groups``."""
        per_chunk = self.group_chunk
        if per_chunk is None:
            if self.group_chunk_bytes is None:
                return groups
            per_chunk = max(heads, self.group_chunk_bytes // (4 * assignment_size))
        fits = [d for d in range(heads, min(per_chunk, groups) + 1, heads) if groups % d == 0]
        return fits[-1] if fits else groups


class ClusteringMixer(nn.Module):
    """Clustering token mixer: (B, H, W, dim) -> ((B, H, W, dim), centers (B, windows**2 * K, heads*e)).

    1x1 convs give queries, keys (``conv_v``) and values (``conv_f``); per (image, head, window) group the
    centers start as adaptive-pooled queries (optionally through Eq. 5's FFN), run T EM steps, and are
    dispatched back to the tokens; ``conv2`` projects the result. ``windows``: windows per side (must divide
    H and W). Options: ``config`` (``MixerConfig``).
    """

    dim: int
    heads: int
    windows: int = 1
    config: MixerConfig = MixerConfig()
    dtype: Dtype = jnp.float32

    def _check(self, h: int, w: int) -> None:
        self.config.validate()
        if h % self.windows or w % self.windows:
            raise ModelConfigError(
                f"a {h}x{w} feature map is not divisible by window count {self.windows}; "
                "set --config.model.kwargs.window_counts to counts that divide every stage's size (e.g. '(8,4,2,1)' for 224 "
                "inputs)"
            )

    def _cluster_groups(self, group_inputs, alpha, beta, grid) -> Tuple[jax.Array, jax.Array]:
        """Center update (Eq. 3) then dispatch for a run of groups: returns (out (G', N, e) float32, centers
        (G', K, e)). ``grid``: the window's (n_h, n_w) tokens."""
        cfg = self.config
        centers, em_keys, em_values, dispatch_queries, values, center_values = group_inputs
        raw = cfg.partition == "raw"
        if cfg.center_update in ("vanilla", "criss_cross"):
            mask = criss_cross_mask(grid, tuple(cfg.centers)) if cfg.center_update == "criss_cross" else None
            centers = AttentionUpdate(cfg.head_dim, cfg.num_iters, self.dtype, name="attention")(
                centers, em_keys, em_values, mask
            )
        elif cfg.center_update != "none":
            centers, _ = em_scan(
                EMStep,
                cfg.num_iters,
                num_broadcast=2,
                remat=cfg.em_remat,
                unroll=cfg.unroll(),
                head_dim=cfg.head_dim,
                heads=self.heads,
                estep_axis=cfg.estep_axis,
                mstep=cfg.mstep,
                query_proj=cfg.query_proj,
                raw_layout=raw,
                update=cfg.center_update,
                dtype=self.dtype,
                name="em",
            )(centers, em_keys, em_values)
        center_dirs = l2_normalize(centers.astype(jnp.float32))
        if cfg.dispatch == "official":
            token_dirs = l2_normalize(dispatch_queries.astype(jnp.float32), axis=1)  # channel-first (G, e, N)
            out = hard_dispatch(
                token_dirs, center_dirs, alpha, beta, values, center_values.astype(jnp.float32), cfg.dispatch_impl
            )
            return (unscramble(out) if raw else out), centers
        token_dirs = l2_normalize(dispatch_queries.astype(jnp.float32))
        if cfg.dispatch == "paper":
            return similarity_dispatch(token_dirs, center_dirs, centers, alpha, beta), centers
        if cfg.dispatch == "fc_similarity":  # Context Cluster: aggregate values at the most similar center
            cf_dirs = jnp.swapaxes(token_dirs, 1, 2)
            out = hard_dispatch(
                cf_dirs, center_dirs, alpha, beta, values, center_values.astype(jnp.float32), cfg.dispatch_impl
            )
            return out, centers
        if cfg.dispatch == "confidence":
            return confidence_dispatch(token_dirs, center_dirs, centers.astype(jnp.float32), alpha), centers
        out = values.astype(jnp.float32)  # 'none': the tokens keep their values
        if cfg.dispatch == "fc":  # every token receives the plain mean of the centers
            out = out + jnp.mean(centers.astype(jnp.float32), axis=1, keepdims=True)
        return out, centers

    @nn.compact
    def __call__(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
        cfg = self.config
        b, h, w, _ = x.shape
        self._check(h, w)
        e, heads, windows = cfg.head_dim, self.heads, max(self.windows, 1)
        inner = heads * e
        raw = cfg.partition == "raw"

        kernels, biases = zip(*(PointwiseParams(inner, self.dim, name=n)() for n in ("conv1", "conv_v", "conv_f")))
        n_h, n_w = h // windows, w // windows
        g, n = b * heads * windows * windows, n_h * n_w
        num_centers = cfg.centers[0] * cfg.centers[1]
        pool = jnp.asarray(adaptive_pool_token_matrix((n_h, n_w), tuple(cfg.centers)), self.dtype)  # (K, N)
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
            # the batch stays the major axis of every merged axis: a device mesh splits the batch, and a merge
            # that put q/k/v before it made XLA's partitioner gather the whole global batch on every device
            stacked = qvf.reshape(b, h, w, 3, inner).transpose(0, 3, 1, 2, 4).reshape(b * 3, h, w, inner)
            parts = window_partition(stacked, heads, windows, "spatial").reshape(b, 3, g // b, n, e)
            q_tok, keys, values = (parts[:, i].reshape(g, n, e) for i in range(3))
            center_values = jnp.einsum("kn,gne->gke", pool, values)
        centers = jnp.einsum("kn,gne->gke", pool, q_tok)
        if cfg.center_ffn:  # Eq. 5: C0 = FFN(AdaptivePool_K(I))
            hidden = nn.Dense(4 * e, dtype=self.dtype, name="center_ffn_fc1")(centers)
            centers = nn.Dense(e, dtype=self.dtype, name="center_ffn_fc2")(gelu(hidden))

        em_keys, em_values = keys, values
        if raw and cfg.estep_axis == "tokens":
            em_keys, em_values = flash_regroup(keys, heads), flash_regroup(values, heads)
        alpha = self.param("sim_alpha", nn.initializers.ones, (1,))
        beta = self.param("sim_beta", nn.initializers.zeros, (1,))
        # the (G, e, N) channel-first queries feed the official dispatch, the (G, N, e) ones Eq. 6
        dispatch_queries = (q_cf if raw else jnp.swapaxes(q_tok, 1, 2)) if cfg.dispatch == "official" else q_tok
        group_inputs = (centers, em_keys, em_values, dispatch_queries, values, center_values)
        per_chunk = cfg.groups_per_chunk(g, heads, num_centers * n)
        if per_chunk == g:
            out, centers = self._cluster_groups(group_inputs, alpha, beta, (n_h, n_w))
        else:
            # every group clusters independently: run them in cache-sized chunks, one loop iteration each
            def body(mdl, carry, chunk):
                return carry, mdl._cluster_groups(chunk, alpha, beta, (n_h, n_w))

            chunked = tuple(t.reshape(g // per_chunk, per_chunk, *t.shape[1:]) for t in group_inputs)
            _, (out, centers) = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})(
                self, None, chunked
            )
            out, centers = out.reshape(g, *out.shape[2:]), centers.reshape(g, *centers.shape[2:])

        out = window_merge(out.astype(self.dtype).reshape(g, n_h, n_w, e), b, heads, windows, cfg.partition)
        if cfg.dispatch in ("paper", "fc", "fc_similarity"):
            out = gelu(pointwise(inner, inner, "dispatch_fc", self.dtype)(out))
        out = pointwise(self.dim, inner, "conv2", self.dtype)(out)

        centers_out = centers.reshape(b, heads, windows * windows * num_centers, e)
        centers_out = centers_out.transpose(0, 2, 1, 3).reshape(b, -1, inner)
        return out, centers_out
