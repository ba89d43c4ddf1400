"""A run as a TensorFlow SavedModel through Orbax Export (``orbax-export``: ``JaxModule``, ``ServingConfig``,
``ExportManager``; the JAX function goes through jax2tf with a symbolic batch dimension).

Signatures:
- ``serving_default``: ``image_bytes`` string (B,) encoded JPEG/PNG -> the task's named outputs in source
  pixels; the eval preprocessing runs in the graph (serving/preprocess.py);
- ``serving_preprocessed``: the model's inputs as the eval pipeline makes them (float32 ``images`` and, for
  dense tasks, ``pixel_mask``, ``orig_size``, ``scale``) -> the same outputs.
Assets: ``config.json`` (the run's), ``serving.json`` (task serving spec with class names and preprocessing
constants, model, step, dtype) and ``class_names.txt``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

SERVING_FILE = "serving.json"
DEFAULT_SIGNATURE = "serving_default"
PREPROCESSED_SIGNATURE = "serving_preprocessed"
BYTES_INPUT = "image_bytes"  # TF Serving's REST API base64-decodes inputs whose name ends in "_bytes"


# TF 2.21's XlaCallModule reads StableHLO up to 1.13.7; jax 0.10.2 writes its 4-week compatibility target
# (1.15.0), whose composite ops (e.g. chlo.erf of the exact GELU) TF cannot read ("unregistered operation
# 'vhlo.composite_v2'"). jax's 12-week target is 1.13.7 (https://openxla.org/stablehlo/compatibility).
TF_STABLEHLO_VERSION = "1.13.7"


@contextlib.contextmanager
def stablehlo_for_tensorflow():
    """While converting, jax2tf serializes StableHLO at ``TF_STABLEHLO_VERSION``. jax 0.10.2 has no public
    setting for the target, so this swaps the serializer of jax's private export module (the one jax2tf
    calls) for ``jax.extend.mlir.serialize_portable_artifact`` at that version, and puts it back after."""
    import jax.extend
    from jax.experimental.jax2tf import jax2tf

    module = jax2tf._export
    original = module._module_to_bytecode

    def to_bytecode(mlir_module):
        sdy = jax.extend.backend.get_backend().serialize_with_sdy
        return jax.extend.mlir.serialize_portable_artifact(mlir_module, TF_STABLEHLO_VERSION, sdy)

    module._module_to_bytecode = to_bytecode
    try:
        yield
    finally:
        module._module_to_bytecode = original


def _assets(config: Any, serving: Any, extra: dict[str, Any]) -> tuple[Any, str]:
    import tensorflow as tf

    folder = tempfile.mkdtemp(prefix="cf_serving_assets_")
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(folder, SERVING_FILE), "w") as f:
        json.dump({"serving": serving.spec(), **extra}, f, indent=2)
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(serving.class_names) + "\n")
    names = ("config.json", SERVING_FILE, "class_names.txt")
    return [tf.saved_model.Asset(os.path.join(folder, n)) for n in names], folder


def save(setup: Any, variables: Any, config: Any, dataset_info: Any, out: str, extra: dict[str, Any]) -> dict:
    """Writes the SavedModel of ``setup``'s task with ``variables`` into ``out``; returns its serving.json."""
    import shutil

    import tensorflow as tf
    from orbax.export import ExportManager, JaxModule, ServingConfig

    from clusterformer_jax.serving import preprocess
    from clusterformer_jax.serving.inference import serving_apply

    serving = setup.task.serving(config, dataset_info)
    steps = serving.preprocess
    assets, folder = _assets(config, serving, extra)
    configs = [  # the JaxModule is built below, with the StableHLO version TF reads
        ServingConfig(
            DEFAULT_SIGNATURE,
            input_signature=[tf.TensorSpec((None,), tf.string, name=BYTES_INPUT)],
            tf_preprocessor=preprocess.batch_preprocess(steps),
            tf_postprocessor=serving.postprocess,
            extra_trackable_resources=assets,
        ),
        ServingConfig(
            PREPROCESSED_SIGNATURE, input_signature=[steps.input_specs()], tf_postprocessor=serving.postprocess
        ),
    ]
    try:
        with stablehlo_for_tensorflow():
            module = JaxModule(variables, serving_apply(setup, per_example=True), input_polymorphic_shape="(b, ...)")
            ExportManager(module, configs).save(out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    with open(os.path.join(out, "assets", SERVING_FILE)) as f:
        return json.load(f)
