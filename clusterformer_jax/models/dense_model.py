"""The dense-prediction model: a backbone module plus the cluster decoder (detection, instance / semantic /
panoptic segmentation).

``DenseModel(backbone=registry.create_backbone(name, ...), decoder=DecoderConfig(**config.model.decoder),
num_classes=80)``. The backbone is the module the classifier of the same preset builds under the name
'backbone', so ``params['backbone']`` has exactly the classifier's ``params['backbone']`` tree and a
classification checkpoint initialises it by name; the decoder's parameters live under ``params['decoder']``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusterformer_jax.errors import ModelConfigError
from clusterformer_jax.models.decoder import ClusterDecoder, DecoderConfig, decoder_fields

__all__ = ["DenseModel", "DecoderConfig", "decoder_fields"]

Dtype = Any


class DenseModel(nn.Module):
    """``__call__(images (B,H,W,3), pixel_mask (B,H,W) bool | None, train) -> dict`` of float32 arrays:

    'class_logits' (L,B,Q,C) sigmoid logits, or (L,B,Q,C+1) softmax logits whose last entry is "no object"
    (``void_class``), 'boxes' (L,B,Q,4) normalised (cx, cy, w, h) of
    the input canvas, 'mask_logits' (L,B,Q,H/4,W/4); L = decoder.num_layers, [-1] is the final prediction.
    ``num_classes=0`` builds no class or box heads and returns only 'mask_logits' (semantic segmentation);
    ``with_boxes=False`` drops the box heads; ``semantic_classes`` > 0 adds the decoder's pixel embeddings and an
    auxiliary semantic head (panoptic; optional for instance segmentation).
    ``pixel_mask`` (True on real pixels) keeps padded canvas cells out of the decoder's clustering.
    """

    backbone: nn.Module
    decoder: DecoderConfig = DecoderConfig()
    num_classes: int = 80
    void_class: bool = False
    with_boxes: bool = True
    semantic_classes: int = 0
    mask_activation: str = "sigmoid"  # the decoder's mask pooling: 'softmax' over queries for panoptic masks
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, images: jax.Array, pixel_mask: Optional[jax.Array] = None, train: bool = False
    ) -> Dict[str, jax.Array]:
        if self.num_classes < 0:
            raise ModelConfigError(f"DenseModel num_classes={self.num_classes} must be >= 0 (0: masks only)")
        if pixel_mask is not None and tuple(pixel_mask.shape) != tuple(images.shape[:3]):
            raise ModelConfigError(
                f"pixel_mask shape {tuple(pixel_mask.shape)} must be the images' (B, H, W) {tuple(images.shape[:3])}"
            )
        feats = self.backbone(images, train)
        decoder = ClusterDecoder(
            self.decoder,
            self.num_classes,
            self.void_class,
            self.with_boxes,
            self.semantic_classes,
            self.mask_activation,
            self.dtype,
            name="decoder",
        )
        return decoder(feats, None if pixel_mask is None else pixel_mask.astype(bool), train)


class HeadModel(nn.Module):
    """A backbone and a head module that reads its four stage maps: ``head(feats['stages'], train)``.

    For heads other than the cluster decoder, e.g. PaCa-ViT's segmentation head; ``pixel_mask`` is accepted
    for the common model signature and unused (padded pixels carry the ignore label in the loss).
    """

    backbone: nn.Module
    head: nn.Module

    @nn.compact
    def __call__(self, images: jax.Array, pixel_mask: Optional[jax.Array] = None, train: bool = False) -> Any:
        del pixel_mask
        return self.head(self.backbone(images, train)["stages"], train)
