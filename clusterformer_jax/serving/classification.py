"""Serving side of image classification: top-k classes with names and softmax scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from clusterformer_jax.serving import base
from clusterformer_jax.serving import preprocess as pre


class ClassificationServing:
    """Outputs ``logits`` (B, K), ``top_k_classes`` int32 (B, k), ``top_k_scores`` (softmax, B, k) and
    ``top_k_names`` string (B, k), k = min(top_k, K); its JSON line lists the top k with names."""

    def __init__(self, class_names: Sequence[str], preprocessing: Mapping[str, Any], top_k: int = 5):
        self.class_names = [str(n) for n in class_names]
        self.top_k = min(int(top_k), len(self.class_names))
        self.preprocessing = dict(preprocessing)
        self.preprocess = pre.from_constants(self.preprocessing)

    def spec(self) -> dict[str, Any]:
        return base.spec_of(self, class_names=self.class_names, preprocessing=self.preprocessing, top_k=self.top_k)

    def postprocess(self, outputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        logits = tf.cast(outputs["logits"], tf.float32)
        scores, classes = tf.math.top_k(tf.nn.softmax(logits, axis=-1), k=self.top_k)
        names = tf.gather(tf.constant(self.class_names), classes)
        return {"logits": logits, "top_k_classes": classes, "top_k_scores": scores, "top_k_names": names}

    def record(self, row: Mapping[str, np.ndarray], out_dir: str, stem: str) -> dict[str, Any]:
        return {
            "top_k": [
                {"class": int(c), "name": self.class_names[int(c)], "score": float(s)}
                for c, s in zip(row["top_k_classes"], row["top_k_scores"])
            ]
        }

    def finish(self, out_dir: str, records: list[dict[str, Any]]) -> None:
        """Nothing beyond the JSON lines."""

    def draw(self, image: np.ndarray, row: Mapping[str, np.ndarray]) -> None:
        """No picture: the JSON line says it all."""
        return None

    def truth(self, batch: Mapping[str, np.ndarray], index: int, shape: tuple[int, int]) -> None:
        return None
