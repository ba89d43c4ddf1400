"""The cluster decoder for dense tasks (paper §3.3, §4.1.2): queries are cluster
centers that each decoder layer refines by T shared-weight EM steps of recurrent cross-attention over one
pixel-decoder level, followed by query self-attention and an FFN; class, box and mask heads after every layer.

Design (the paper releases no decoder code; the choices below follow Mask2Former, kMaX-DeepLab and
Deformable DETR where the paper is silent):
  * Pixel features: ``pixel_decoder.PixelDecoder`` (an FPN) at strides 32/16/8 plus a stride-4 mask feature;
    the layers visit them kMaX-style, two layers per stride 32 -> 16 -> 8 (``layer_strides``).
  * E-step (Eq. 3/4): M = softmax over the Q queries of (Q^C K^I^T)/sqrt(e) per head; pixels outside the
    image (``pixel_mask`` False, brought to the layer's grid) get zero assignment.
  * M-step: C <- C + W_o (M V^I / sum_n M), the assignment-weighted *mean* of the values per query. Eq. 3's
    plain sum grows with the number of pixels (stride 8 at 1024^2 sums 16k pixels, stride 32 1k), so its
    scale would differ between layers, image sizes and padding; dividing by each query's assignment mass
    keeps the update at feature scale for every level and resolution, and padded pixels change neither the
    numerator nor the mass (exact padding invariance of the step). A LayerNorm after the sum would fix the
    scale but still let the pixel count and padding change the direction mix of empty clusters.
  * Keys carry DETR's sine positions of the real pixels (``sine_positions``); queries carry their
    position embedding (``queries.QueryInit``) in the E-step projection and the self-attention.
  * Pre-LayerNorm residual blocks (EM update, self-attention, FFN) with one LayerNorm before the heads: the
    residual stream is the identity path through 6 layers x T steps, which trains without warm-up tricks.
  * Heads: class Dense (focal prior bias -log(99)) and the mask-embedding MLP are shared by all layers
    (Mask2Former); boxes as Deformable DETR: ``box_refine`` per-layer MLPs predict deltas in inverse-sigmoid
    space from a reference that is detached between layers (initial reference: an MLP on the initial
    queries); without it one shared MLP predicts sigmoid boxes directly at each layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models.em import e_step, em_scan, m_step
from clusterformer_jax.models.layers import gelu
from clusterformer_jax.models.pixel_decoder import PixelDecoder, check_blocks, mask_to_grid, sine_positions
from clusterformer_jax.models.queries import QUERY_INITS, QueryInit

Dtype = Any
LAYER_STRIDES = (8, 16, 32)
BOX_REFERENCES = ("previous", "mask")
FOCAL_PRIOR = -math.log((1 - 0.01) / 0.01)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The cluster decoder's fields (``config.model.decoder`` as a dict: ``DecoderConfig(**dict)``).

    dim: query and pixel-feature width. num_queries: Q. num_layers: decoder layers (L predictions).
    num_iters: T EM steps per layer, one set of weights (Table 6b). layer_strides: the pixel-decoder level
    (32, 16 or 8) each layer clusters. num_heads / ffn_dim: E-step and self-attention heads, FFN width.
    query_init: Table 6f's rows (see ``queries.py``). box_refine: Deformable DETR's iterative refinement.
    box_reference (with box_refine): 'previous' refines the previous layer's box (Deformable DETR); 'mask'
    refines the box around the layer's own predicted mask (Mask DINO's mask-enhanced boxes: the cluster's
    extent is the box, the head learns the correction; use it when masks are trained).
    mask_pooling: the class and box heads also read the stride-4 pixel features averaged inside the query's
    own predicted mask (no gradient through the mask weights), so a query's class comes from its object's
    pixels even while its center still mixes in background (RoI-style mask pooling).
    mask_prior: each layer's E-step adds the previous prediction's mask logits (detached, resized to the
    layer's grid) to its query-pixel logits, so a pixel joins the cluster whose mask claims it (Mask2Former's
    masked attention as a soft bias; kMaX's clusters-as-masks); layer 0 uses the masks of the initial queries.
    dropout: self-attention and FFN dropout. em_remat: the backward pass recomputes each EM step from its
    input queries instead of storing its (B, heads, Q, N) assignment (6 layers x T of them at stride 8 are
    most of a 1024^2 step's decoder memory); same values. em_unroll: EM steps per scan-loop iteration
    (None: all T).
    pixel_blocks: the pixel decoder's bottleneck blocks at strides (32, 16, 8, 4) (kMaX: 1, 5, 1, 1); zeros: FPN.
    """

    dim: int = 256
    num_queries: int = 100
    num_layers: int = 6
    num_iters: int = 3
    layer_strides: Tuple[int, ...] = (32, 32, 16, 16, 8, 8)
    num_heads: int = 8
    ffn_dim: int = 2048
    query_init: str = "encoder_centers"
    box_refine: bool = True
    box_reference: str = "previous"
    mask_pooling: bool = False
    mask_prior: bool = False
    dropout: float = 0.0
    em_remat: bool = True
    em_unroll: Optional[int] = None
    pixel_blocks: Tuple[int, ...] = (0, 0, 0, 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_strides", tuple(int(s) for s in self.layer_strides))
        object.__setattr__(self, "pixel_blocks", tuple(int(s) for s in self.pixel_blocks))
        self.validate()

    def validate(self) -> None:
        for field in ("dim", "num_queries", "num_layers", "num_iters", "num_heads", "ffn_dim"):
            if int(getattr(self, field)) < 1:
                raise ModelConfigError(f"decoder field {field}={getattr(self, field)} must be >= 1")
        if self.em_unroll is not None and self.em_unroll < 1:
            raise ModelConfigError(f"decoder field em_unroll={self.em_unroll} must be >= 1 or None (all T steps)")
        if self.dim % self.num_heads:
            raise ModelConfigError(f"decoder field dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.dim % 4:
            raise ModelConfigError(f"decoder field dim={self.dim} must be a multiple of 4 (2-D sine positions)")
        if len(self.layer_strides) != self.num_layers:
            raise ModelConfigError(
                f"decoder field layer_strides has {len(self.layer_strides)} entries but num_layers="
                f"{self.num_layers}; give one stride (32, 16 or 8) per layer"
            )
        bad = [s for s in self.layer_strides if s not in LAYER_STRIDES]
        if bad:
            raise ModelConfigError(
                f"decoder field layer_strides has {bad[0]}; each entry must be one of {LAYER_STRIDES}"
            )
        check_blocks(self.pixel_blocks)
        if self.query_init not in QUERY_INITS:
            raise ModelConfigError(f"decoder field query_init={self.query_init!r} is not one of {QUERY_INITS}")
        if self.box_reference not in BOX_REFERENCES:
            raise ModelConfigError(f"decoder field box_reference={self.box_reference!r} is not one of {BOX_REFERENCES}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"decoder field dropout={self.dropout} must be in [0, 1)")

    def unroll(self) -> int:
        return self.num_iters if self.em_unroll is None else min(self.em_unroll, self.num_iters)


def decoder_fields() -> Tuple[str, ...]:
    """The ``DecoderConfig`` field names (what ``config.model.decoder`` may set)."""
    return tuple(f.name for f in dataclasses.fields(DecoderConfig))


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """(B, N, D) -> (B, heads, N, D / heads)."""
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, heads, N, e) -> (B, N, heads * e)."""
    b, h, n, e = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * e)


class ClusterEMStep(nn.Module):
    """One EM iteration, the body of the layer's ``nn.scan`` (weights shared across the T iterations).

    Carry: the queries (B, Q, D). Broadcast: query positions (B, Q, D), keys/values (B, h, N, e), valid (B, N),
    prior (B, Q, N) or None. C <- C + W_o M-step(E-step(W_q (LN(C) + pos), K, prior), V).
    With the ``intermediates`` collection mutable, the E-step's M (B, h, Q, N) is sown as ``assignment``.
    """

    dim: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, pos, keys, values, valid, prior=None):
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(queries) + pos
        q = split_heads(nn.Dense(self.dim, dtype=self.dtype, name="query")(x), self.heads)
        # every head: valid (B, 1, N), prior (B, 1, Q, N)
        prior = None if prior is None else prior[:, None]
        assign = e_step(q, keys, "clusters", q.shape[-1] ** -0.5, valid[:, None], prior)
        if self.is_mutable_collection("intermediates"):  # the cluster maps (visualize.py), as the encoder's EMStep
            self.sow("intermediates", "assignment", assign)
        update = merge_heads(m_step(assign, values, mean=True))
        queries = queries + nn.Dense(self.dim, dtype=self.dtype, name="out")(update.astype(self.dtype))
        return queries, None


class ClusterDecoderLayer(nn.Module):
    """Recurrent cross-attention clustering over one pixel level, then query self-attention and an FFN.

    ``__call__(queries (B,Q,D), pos (B,Q,D), feature (B,h,w,D), valid (B,h,w) bool, deterministic)``.
    Keys (features + sine positions) and values are projected once; only the queries change across the T
    EM steps (paper §3.2 "Efficiency").
    """

    config: DecoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, pos, feature, valid, deterministic: bool = True, prior=None):
        cfg = self.config
        b, h, w, d = feature.shape
        tokens = feature.astype(self.dtype).reshape(b, h * w, d)
        sine = sine_positions(valid, d).reshape(b, h * w, d).astype(self.dtype)
        keys = split_heads(nn.Dense(cfg.dim, dtype=self.dtype, name="key")(tokens + sine), cfg.num_heads)
        values = split_heads(nn.Dense(cfg.dim, dtype=self.dtype, name="value")(tokens), cfg.num_heads)
        em = em_scan(
            ClusterEMStep,
            cfg.num_iters,
            num_broadcast=5,
            remat=cfg.em_remat,
            unroll=cfg.unroll(),
            dim=cfg.dim,
            heads=cfg.num_heads,
            dtype=self.dtype,
            name="em",
        )
        queries, _ = em(
            queries.astype(self.dtype), pos.astype(self.dtype), keys, values, valid.reshape(b, h * w), prior
        )

        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="self_attn_norm")(queries)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=cfg.num_heads, dtype=self.dtype, dropout_rate=cfg.dropout, name="self_attn"
        )(x + pos, x + pos, x, deterministic=deterministic)
        queries = queries + nn.Dropout(cfg.dropout)(attn, deterministic)

        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ffn_norm")(queries)
        x = gelu(nn.Dense(cfg.ffn_dim, dtype=self.dtype, name="ffn_fc1")(x))
        x = nn.Dense(cfg.dim, dtype=self.dtype, name="ffn_fc2")(nn.Dropout(cfg.dropout)(x, deterministic))
        return queries + nn.Dropout(cfg.dropout)(x, deterministic)


class MLP(nn.Module):
    """``layers`` Dense layers with ReLU between (DETR's box/mask MLP); options for the last layer's init."""

    hidden: int
    out: int
    layers: int = 3
    zero_last: bool = False
    last_bias: Optional[Tuple[float, ...]] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.layers - 1):
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name=f"fc{i}")(x))
        kernel_init = nn.initializers.zeros if self.zero_last else nn.linear.default_kernel_init
        bias = self.last_bias
        bias_init = nn.initializers.zeros if bias is None else (lambda *_: jnp.asarray(bias, jnp.float32))
        return nn.Dense(
            self.out, dtype=self.dtype, kernel_init=kernel_init, bias_init=bias_init, name=f"fc{self.layers - 1}"
        )(x)


def mask_boxes(mask_logits: jax.Array, fallback: jax.Array) -> jax.Array:
    """Normalised (cx, cy, w, h) of each mask's foreground (logit > 0) on its grid, clipped to [0.01, 0.99] so
    the refinement's inverse sigmoid stays unsaturated, no gradient; masks with no foreground keep
    ``fallback``. mask_logits (B, Q, h, w), fallback (B, Q, 4)."""
    fg = jax.lax.stop_gradient(mask_logits) > 0
    h, w = fg.shape[-2:]

    def extent(any_along: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
        index = jnp.arange(size)
        lo = jnp.min(jnp.where(any_along, index, size), axis=-1)
        hi = jnp.max(jnp.where(any_along, index + 1, 0), axis=-1)
        return lo.astype(jnp.float32) / size, hi.astype(jnp.float32) / size

    y0, y1 = extent(jnp.any(fg, axis=-1), h)
    x0, x1 = extent(jnp.any(fg, axis=-2), w)
    box = jnp.clip(jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1), 0.01, 0.99)
    return jnp.where(jnp.any(fg, axis=(-2, -1))[..., None], box, jax.lax.stop_gradient(fallback))


def inverse_sigmoid(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Deformable DETR's clipped logit: log(x / (1 - x)) with both terms clamped at ``eps``."""
    x = jnp.clip(x, 0.0, 1.0)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


# initial boxes (cx, cy, w, h) = sigmoid(0, 0, -2, -2) = (0.5, 0.5, 0.12, 0.12) before the content moves them
_BOX_BIAS = (0.0, 0.0, -2.0, -2.0)


class ClusterDecoder(nn.Module):
    """Backbone features -> {'class_logits' (L,B,Q,C) (C+1 with ``void_class``), 'boxes' (L,B,Q,4) cxcywh in [0,1], 'mask_logits'
    (L,B,Q,h4,w4)}, all float32, one prediction after each decoder layer ([-1] is the final one); with
    ``num_classes=0`` only 'mask_logits' (no class or box heads); without ``with_boxes`` no 'boxes'; with
    ``semantic_classes`` = S > 0 also the stride-4 'pixel_embeddings' (B,h4,w4,D) and an auxiliary per-pixel
    'semantic_logits' (B,h4,w4,S) from a 1x1 head on them (kMaX's instance-discrimination and auxiliary
    semantic losses)."""

    config: DecoderConfig
    num_classes: int
    void_class: bool = False  # a last "no object" logit (softmax class loss); else sigmoid logits
    with_boxes: bool = True  # False: no box heads (panoptic segmentation)
    semantic_classes: int = 0  # > 0: also 'pixel_embeddings' and an auxiliary 'semantic_logits' head
    # How mask logits become masks where the decoder reads them (mask pooling): 'sigmoid' per query
    # (instance segmentation), 'softmax' over the queries (panoptic: every pixel belongs to one segment).
    mask_activation: str = "sigmoid"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Dict[str, Any], pixel_mask: Optional[jax.Array] = None, train: bool = False):
        cfg = self.config
        if self.mask_activation not in ("sigmoid", "softmax"):
            raise ModelConfigError(f"mask_activation={self.mask_activation!r} must be 'sigmoid' or 'softmax'")
        softmax_masks = self.mask_activation == "softmax"
        pixels = PixelDecoder(cfg.dim, cfg.pixel_blocks, self.dtype, name="pixel_decoder")(feats["stages"])
        batch = pixels[4].shape[0]
        content, pos = QueryInit(cfg.query_init, cfg.num_queries, cfg.dim, self.dtype, name="query_init")(
            feats, pixels[32], pixel_mask
        )
        valid = {
            s: (
                jnp.ones((batch, *pixels[s].shape[1:3]), bool)
                if pixel_mask is None
                else mask_to_grid(pixel_mask, pixels[s].shape[1:3])
            )
            for s in set(cfg.layer_strides)
        }
        output_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="output_norm")
        mask_embed = MLP(cfg.dim, cfg.dim, dtype=self.dtype, name="mask_embed")
        heads = self.num_classes > 0  # 0: masks only (semantic segmentation: query k is class k)
        if heads:
            class_head = nn.Dense(
                self.num_classes + int(self.void_class),
                dtype=self.dtype,
                bias_init=nn.initializers.zeros if self.void_class else nn.initializers.constant(FOCAL_PRIOR),
                name="class_head",
            )
        if heads and cfg.mask_pooling:
            pool_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="mask_pool_norm")
            pool_proj = nn.Dense(cfg.dim, dtype=self.dtype, name="mask_pool_proj")
            valid4 = None if pixel_mask is None else mask_to_grid(pixel_mask, pixels[4].shape[1:3])
        boxes_on = heads and self.with_boxes
        if boxes_on and cfg.box_refine:
            init_box = MLP(cfg.dim, 4, last_bias=_BOX_BIAS, dtype=self.dtype, name="init_box")(content + pos)
            reference = jax.nn.sigmoid(init_box.astype(jnp.float32))
        elif boxes_on:
            box_head = MLP(cfg.dim, 4, last_bias=_BOX_BIAS, dtype=self.dtype, name="box_head")

        def predict_mask(queries):
            embed = mask_embed(output_norm(queries))
            return jnp.einsum("bqd,bhwd->bqhw", embed, pixels[4], preferred_element_type=jnp.float32)

        logits, boxes, masks = [], [], []
        mask = predict_mask(content) if cfg.mask_prior else None
        for index, stride in enumerate(cfg.layer_strides):
            prior = None
            if cfg.mask_prior:
                grid = pixels[stride].shape[1:3]
                prior = jax.image.resize(jax.lax.stop_gradient(mask), (*mask.shape[:2], *grid), "linear")
                prior = prior.reshape(*mask.shape[:2], grid[0] * grid[1])
            content = ClusterDecoderLayer(cfg, self.dtype, name=f"layer_{index}")(
                content, pos, pixels[stride], valid[stride], not train, prior
            )
            out = output_norm(content)
            mask = predict_mask(content)
            masks.append(mask)
            if not heads:
                continue
            if cfg.mask_pooling:
                detached = jax.lax.stop_gradient(mask)
                weights = jax.nn.softmax(detached, axis=1) if softmax_masks else jax.nn.sigmoid(detached)
                if pixel_mask is not None:
                    weights = weights * valid4[:, None]
                pooled = jnp.einsum("bqhw,bhwd->bqd", weights, pixels[4].astype(jnp.float32))
                pooled = pooled / (jnp.sum(weights, axis=(2, 3))[..., None] + 1.0)
                out = out + pool_proj(pool_norm(pooled.astype(self.dtype)))
            logits.append(class_head(out).astype(jnp.float32))
            if not boxes_on:
                continue
            if cfg.box_refine:
                if cfg.box_reference == "mask":
                    reference = mask_boxes(mask, reference)
                delta = MLP(cfg.dim, 4, zero_last=True, dtype=self.dtype, name=f"box_head_{index}")(out)
                box = jax.nn.sigmoid(delta.astype(jnp.float32) + inverse_sigmoid(reference))
                reference = jax.lax.stop_gradient(box)  # Deformable DETR: detached between layers
            else:
                box = jax.nn.sigmoid(box_head(out).astype(jnp.float32))
            boxes.append(box)
        outputs = {"mask_logits": jnp.stack(masks).astype(jnp.float32)}
        if heads:
            outputs["class_logits"] = jnp.stack(logits)
        if boxes_on:
            outputs["boxes"] = jnp.stack(boxes)
        if self.semantic_classes > 0:
            outputs["pixel_embeddings"] = pixels[4].astype(jnp.float32)
            semantic = nn.Dense(self.semantic_classes, dtype=self.dtype, name="aux_semantic_head")(pixels[4])
            outputs["semantic_logits"] = semantic.astype(jnp.float32)
        return outputs
