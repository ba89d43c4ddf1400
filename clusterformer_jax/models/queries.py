"""Decoder query initialisation, the five rows of the paper's Table 6f.

Every mode returns ``(content, position)``, both (B, Q, dim): the content queries are the cluster centers the
decoder's EM steps update; the position embedding is added to the queries wherever they are compared
(E-step query projection, self-attention queries/keys), as DETR's query_pos.

  'encoder_centers'   the paper's design: the backbone's last-block cluster centers (B, N, D) -> adaptive
                      average pool of the center axis to Q (PyTorch bins, only when N != Q) -> LayerNorm ->
                      Dense(dim). A backbone without 'centers' (the peers) gives the last stage map
                      adaptive-average-pooled to a (qh, qw) grid instead (qh*qw = Q, qh the largest divisor
                      of Q <= sqrt(Q)). Learned position embedding.
  'free'              learned content and position embeddings (Mask2Former's query_feat / query_embed).
  'feature_embedding' the pooled last-stage grid (as above) -> LayerNorm -> Dense, for every backbone.
  'mixed_selection'   DINO's mixed query selection: the position part is the top-Q stride-32 pixel features
                      by a learned objectness score (LayerNorm -> Dense, scaled by sigmoid(score) so the
                      score gets a gradient without DINO's encoder-proposal loss); the content part is
                      learned. Maps with fewer than Q cells are tiled until they have Q candidates.
  'scene_adaptive'    learned content plus a 2-layer MLP of the globally pooled (real pixels) last-stage
                      feature, added to every query; learned position embedding.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models.layers import adaptive_avg_pool, adaptive_pool_matrix, gelu
from clusterformer_jax.models.pixel_decoder import mask_to_grid

Dtype = Any
QUERY_INITS = ("encoder_centers", "free", "feature_embedding", "mixed_selection", "scene_adaptive")


def query_grid(num_queries: int) -> Tuple[int, int]:
    """(qh, qw) with qh * qw = Q and qh the largest divisor of Q not above sqrt(Q) (100 -> 10x10, 8 -> 2x4)."""
    qh = max(d for d in range(1, math.isqrt(num_queries) + 1) if num_queries % d == 0)
    return qh, num_queries // qh


def pool_centers(centers: jax.Array, num_queries: int) -> jax.Array:
    """(B, N, D) -> (B, Q, D) by PyTorch AdaptiveAvgPool1d bins over the center axis (identity when N == Q)."""
    if centers.shape[1] == num_queries:
        return centers
    mat = jnp.asarray(adaptive_pool_matrix(centers.shape[1], num_queries), centers.dtype)
    return jnp.einsum("qn,bnd->bqd", mat, centers)


def pooled_grid(feature: jax.Array, num_queries: int) -> jax.Array:
    """(B, h, w, C) -> (B, Q, C): adaptive average pool to the ``query_grid`` and flatten row-major."""
    qh, qw = query_grid(num_queries)
    pooled = adaptive_avg_pool(feature, (qh, qw))
    return pooled.reshape(feature.shape[0], qh * qw, feature.shape[-1])


class QueryInit(nn.Module):
    """``(backbone features, pixel-decoder stride-32 map, pixel mask) -> (content, position)`` (B, Q, dim)."""

    mode: str
    num_queries: int
    dim: int
    dtype: Dtype = jnp.float32

    def _learned(self, name: str, batch: int) -> jax.Array:
        table = self.param(name, nn.initializers.normal(1.0), (self.num_queries, self.dim))
        return jnp.broadcast_to(table.astype(self.dtype), (batch, self.num_queries, self.dim))

    def _project(self, name: str, x: jax.Array) -> jax.Array:
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=f"{name}_norm")(x.astype(self.dtype))
        return nn.Dense(self.dim, dtype=self.dtype, name=f"{name}_proj")(x)

    @nn.compact
    def __call__(
        self, feats: Dict[str, Any], pixel32: jax.Array, pixel_mask: Optional[jax.Array]
    ) -> Tuple[jax.Array, jax.Array]:
        if self.mode not in QUERY_INITS:
            raise ModelConfigError(f"decoder field query_init={self.mode!r} is not one of {QUERY_INITS}")
        last = feats["stages"][-1]
        batch = last.shape[0]
        pos = self._learned("query_pos", batch) if self.mode != "mixed_selection" else None
        if self.mode == "encoder_centers":
            centers = feats.get("centers")
            source = pooled_grid(last, self.num_queries) if centers is None else pool_centers(centers, self.num_queries)
            return self._project("centers", source), pos
        if self.mode == "free":
            return self._learned("query_feat", batch), pos
        if self.mode == "feature_embedding":
            return self._project("feature", pooled_grid(last, self.num_queries)), pos
        if self.mode == "scene_adaptive":
            if pixel_mask is None:
                pooled = jnp.mean(last.astype(jnp.float32), axis=(1, 2))
            else:
                valid = mask_to_grid(pixel_mask, last.shape[1:3]).astype(jnp.float32)[..., None]
                pooled = jnp.sum(last * valid, axis=(1, 2)) / jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1.0)
            hidden = gelu(nn.Dense(self.dim, dtype=self.dtype, name="scene_fc1")(pooled.astype(self.dtype)))
            scene = nn.Dense(self.dim, dtype=self.dtype, name="scene_fc2")(hidden)
            return self._learned("query_feat", batch) + scene[:, None, :], pos
        # mixed_selection
        b, h, w, c = pixel32.shape
        tokens = pixel32.reshape(b, h * w, c)
        score = nn.Dense(1, dtype=self.dtype, name="objectness")(tokens)[..., 0].astype(jnp.float32)
        if pixel_mask is not None:
            score = jnp.where(mask_to_grid(pixel_mask, (h, w)).reshape(b, h * w), score, -1e9)
        reps = -(-self.num_queries // (h * w))
        if reps > 1:
            tokens, score = jnp.tile(tokens, (1, reps, 1)), jnp.tile(score, (1, reps))
        top, index = jax.lax.top_k(score, self.num_queries)
        chosen = jnp.take_along_axis(tokens, index[..., None], axis=1)
        pos = self._project("selection", chosen) * jax.nn.sigmoid(top)[..., None].astype(self.dtype)
        return self._learned("query_feat", batch), pos
