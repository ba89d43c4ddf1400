"""What the dense tasks (detection, instance / semantic / panoptic segmentation) share: the model's inputs
(images + pixel-validity mask), config sections as plain dicts, and building the backbone and cluster decoder
with config mistakes turned into one-line errors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusterformer_jax.errors import ConfigError
from clusterformer_jax.models import registry as model_registry
from clusterformer_jax.models.decoder import DecoderConfig


def as_dict(section: Any) -> dict[str, Any]:
    """A config section (ConfigDict, mapping or None) as a plain dict."""
    return section.to_dict() if hasattr(section, "to_dict") else dict(section or {})


def config_section(
    config: Mapping[str, Any], name: str, fields: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, Any]:
    """``config.<name>`` as a dict holding every field of ``fields`` and none outside ``fields`` + ``optional``
    (a one-line ConfigError otherwise). The tasks take no fallbacks: each default is written once, in the
    section of configs/dense.py (``optional``: fields whose defaults are a dataclass's, e.g. the loss weights)."""
    section = as_dict(config.get(name))
    known = tuple(fields) + tuple(optional)
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(f"config.{name} has no field {unknown[0]!r}; valid: {sorted(known)}")
    missing = [field for field in fields if field not in section]
    if missing:
        raise ConfigError(
            f"config.{name} lacks field {missing[0]!r}: build the config from configs/dense.py ({name}_config())"
        )
    return section


def backbone_and_decoder(
    model_name: str, model_kwargs: Mapping[str, Any], decoder_fields: Mapping[str, Any] | None
) -> tuple[nn.Module, DecoderConfig | None]:
    """The preset's backbone and ``DecoderConfig(**decoder_fields)`` (None without fields); an unknown model,
    field or bad value is a ConfigError."""
    try:
        backbone = model_registry.create_backbone(model_name, **model_kwargs)
        decoder = None if decoder_fields is None else DecoderConfig(**decoder_fields)
    except TypeError as e:
        raise ConfigError(f"config.model.decoder: {e}") from None
    except ValueError as e:  # ModelConfigError: unknown model / field, bad decoder values
        raise ConfigError(str(e)) from None
    return backbone, decoder


class DenseInputs:
    """The dense model's inputs, square ``image_size`` canvases at init; batches pass to the loss unchanged."""

    image_size: int

    def dummy_inputs(self, batch_size: int) -> dict[str, jax.Array]:
        side = self.image_size
        return {
            "images": jnp.zeros((batch_size, side, side, 3), jnp.float32),
            "pixel_mask": jnp.ones((batch_size, side, side), jnp.bool_),
        }

    def model_inputs(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return {"images": batch["image"], "pixel_mask": batch["image_mask"]}

    def prepare_train_batch(self, batch: Mapping[str, jax.Array], rng: jax.Array) -> dict[str, jax.Array]:
        return dict(batch)
