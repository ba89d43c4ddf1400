r"""Exports a trained run for serving: parameters only, and a serialized inference function.

  python -m clusterformer_jax.export --workdir=RUN --out=DIR [--format=jax|saved_model] [--bf16]
      [--platforms=cpu,cuda,tpu]

``--format=saved_model`` writes DIR as a TensorFlow SavedModel through Orbax Export (serving/saved_model.py:
a ``serving_default`` signature on encoded images with the eval preprocessing in the graph, a
``serving_preprocessed`` one on model inputs, the task's outputs in source pixels; docs/serving.md).
The default ``--format=jax`` writes into DIR:
- ``params/``: an Orbax checkpoint of {'params'[, 'batch_stats']} (the latest step of RUN; ``--bf16``
  floating leaves in bfloat16), with ``config.json`` and ``dataset_info.json`` beside it;
- ``model.jax_exported``: ``jax.export`` of the inference function (StableHLO, parameters embedded) with a
  symbolic batch dimension: {input name: array} -> the task's fixed-shape predictions (dense tasks: what
  ``task.predict`` hands the evaluator, e.g. top-k boxes / scores / labels / masks, or semantic logits) or,
  for classification, the logits. Inputs are what the eval pipeline feeds the model ('images', float32
  NHWC, normalised with the config's input.mean / input.std; dense tasks add 'pixel_mask', bool, on the
  eval canvas of eval_image_size);
- ``signature.json``: input and output names, shapes ('b' the batch) and dtypes;
- ``load_exported.py``: a standalone loader that needs only jax and numpy
  (``python DIR/load_exported.py DIR [inputs.npz] [outputs.npz]``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags

from clusterformer_jax.serving.inference import BATCH_DEPENDENT_FIELDS
from clusterformer_jax.serving.inference import ReadsBeyondInputs as _ReadsBeyondInputs
from clusterformer_jax.serving.inference import batch_from_inputs as _batch_from_inputs


def define_flags() -> None:
    """The command line (defined only when run as a script, so the module imports beside main and predict)."""
    flags.DEFINE_string("workdir", None, "A training run's workdir (config.json + checkpoints).")
    flags.DEFINE_string("out", None, "Directory to write the export into (created; must be empty).")
    flags.DEFINE_enum("format", "jax", FORMATS, "jax: params + jax.export artifact; saved_model: TF SavedModel.")
    flags.DEFINE_bool("bf16", False, "Store floating parameters as bfloat16 (halves the size).")
    flags.DEFINE_list("platforms", [], "Platforms the function is lowered for (default: this one).")


EXPORTED_FILE = "model.jax_exported"
SIGNATURE_FILE = "signature.json"
LOADER_FILE = "load_exported.py"
PARAMS_DIR = "params"
# trainers.trainer.DATASET_INFO_FILE, not imported from there: the trainer loads TensorFlow (CLU's writers).
DATASET_INFO_FILE = "dataset_info.json"
BATCH = "b"
FORMATS = ("jax", "saved_model")

LOADER = '''"""Runs an exported clusterformer_jax model with jax and numpy only.

python load_exported.py EXPORT_DIR [inputs.npz] [outputs.npz]
inputs.npz holds one array per input named in signature.json (any batch size); without it, zeros of batch 2.
"""
import json, os, sys

import jax
import numpy as np

directory = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(directory, "model.jax_exported"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
with open(os.path.join(directory, "signature.json")) as f:
    signature = json.load(f)
if len(sys.argv) > 2:
    inputs = dict(np.load(sys.argv[2]))
else:
    inputs = {k: np.zeros([2 if d == "b" else d for d in v["shape"]], v["dtype"]) for k, v in signature["inputs"].items()}
outputs = jax.tree.map(np.asarray, exported.call(inputs))
flat = {"output" + jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(outputs)}
for name, value in flat.items():
    print(f"{name}: shape {value.shape} dtype {value.dtype}")
if len(sys.argv) > 3:
    np.savez(sys.argv[3], **flat)
'''


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def load_run(workdir: str) -> tuple[Any, dict[str, Any]]:
    """(config, dataset_info) of a training run's workdir."""
    import ml_collections

    from clusterformer_jax.errors import ConfigError
    from clusterformer_jax.tasks import registry as task_registry

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{workdir!r} holds no config.json; pass the workdir of a training run")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    info_path = os.path.join(workdir, DATASET_INFO_FILE)
    if os.path.isfile(info_path):
        with open(info_path) as f:
            return config, json.load(f)
    return config, dict(task_registry.input_module(config).get_dataset_info(config.input))


def one_device_setup(config: Any, dataset_info: dict[str, Any]) -> Any:
    """The ``Setup`` a run's model is served and inspected in: one device, no schedule to speak of."""
    import jax

    from clusterformer_jax import sharding
    from clusterformer_jax.trainers.setup import build

    mesh = sharding.create_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    return build(config, mesh, dataset_info, total_steps=1, steps_per_epoch=1.0)


def restore_run(workdir: str) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """(config, dataset_info, one-device ``Setup``, variables of the latest checkpoint) of a training run's
    workdir; the variables are restored into their shapes, the model is never initialised."""
    config, dataset_info = load_run(workdir)
    setup = one_device_setup(config, dataset_info)
    variables, _ = load_variables(workdir, setup)
    return config, dataset_info, setup, variables


def load_variables(workdir: str, setup: Any) -> tuple[dict[str, Any], int]:
    """({'params'[, 'batch_stats']} of the run's latest checkpoint, its step)."""
    from clusterformer_jax import checkpointing
    from clusterformer_jax.errors import ConfigError

    abstract = setup.abstract_with_shardings()
    wanted = {"params": abstract.params}
    if abstract.batch_stats:
        wanted["batch_stats"] = abstract.batch_stats
    try:
        ckpt, step = checkpointing.open_readonly(workdir)
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; train the run first") from None
    restored = ckpt.restore_subtree(wanted, step)
    ckpt.close()
    variables = {"params": restored["params"]}
    if "batch_stats" in restored:
        variables["batch_stats"] = restored["batch_stats"]
    return variables, step


def inference_functions(setup: Any, variables: dict[str, Any]):
    """(predict, forward): inputs -> the task's fixed-shape ``predict``, and inputs -> the model's outputs,
    with ``variables`` closed over, evaluation mode.

    ``export`` serializes ``predict`` (dense tasks: boxes / scores / labels / masks, semantic logits,
    panoptic segments) unless it reads more of the batch than the model's inputs, and then ``forward``
    (classification, whose ``predict`` scores against labels: the logits).
    """
    import jax
    import jax.numpy as jnp

    # Chunking the clustering over groups depends on the batch size; the symbolic batch needs one loop-free
    # program (an execution setting: same numbers, runtime.py).
    kwargs = dict(setup.model_kwargs)
    for field in BATCH_DEPENDENT_FIELDS:
        if field in kwargs:
            kwargs[field] = None
    model, task = setup.task.build_model(setup.config.model.name, kwargs), setup.task
    reference = jax.tree.map(lambda a: a.dtype, setup.abstract_state.params)

    def forward(inputs: dict[str, jax.Array]):
        params = jax.tree.map(lambda p, dtype: jnp.asarray(p).astype(dtype), variables["params"], reference)
        full = {"params": params, **{k: v for k, v in variables.items() if k != "params"}}
        return model.apply(full, **inputs, train=False)

    def predict(inputs: dict[str, jax.Array]):
        return task.predict(forward(inputs), _batch_from_inputs(task, inputs))

    return predict, forward


def input_specs(setup: Any, batch: Any, canvas: int | None = None) -> dict[str, Any]:
    """ShapeDtypeStructs of the model inputs with batch dimension ``batch`` (an int or a symbolic dim).

    ``canvas``: the side of the square eval canvas of a dense task (dataset_info's eval_image_size), which
    replaces the train crop of ``dummy_inputs`` in every image-like input (B, H, W, ...).
    """
    import jax

    dummy = setup.task.dummy_inputs(1)

    def shape(v):
        return (canvas, canvas, *v.shape[3:]) if canvas and v.ndim >= 3 else v.shape[1:]

    return {k: jax.ShapeDtypeStruct((batch, *shape(v)), v.dtype) for k, v in dummy.items()}


def _describe(tree: Any) -> dict[str, Any]:
    import jax

    def one(x):
        return {"shape": [d if isinstance(d, int) else BATCH for d in x.shape], "dtype": str(x.dtype)}

    return {jax.tree_util.keystr(path) or "output": one(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def export(
    workdir: str, out: str, *, bf16: bool = False, platforms: Sequence[str] = (), format: str = "jax"
) -> dict[str, Any]:
    """Writes the export of ``workdir`` into ``out``; returns the signature (``format='saved_model'``: the
    SavedModel's serving.json)."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from clusterformer_jax.errors import ConfigError

    config, dataset_info = load_run(workdir)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {out!r} exists and is not an empty directory; pass a new directory")
    setup = one_device_setup(config, dataset_info)
    if format not in FORMATS:
        raise ConfigError(f"--format={format!r} is not one of {', '.join(FORMATS)}")
    variables, step = load_variables(workdir, setup)
    if bf16:
        variables = jax.tree.map(
            lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, variables
        )
    if format == "saved_model":
        from clusterformer_jax.serving import saved_model

        extra = {"task": config.task, "model": config.model.name, "step": step, "bf16": bf16}
        return saved_model.save(setup, variables, config, dataset_info, out, extra)
    os.makedirs(out, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(os.path.join(out, PARAMS_DIR)), variables)
    shutil.copyfile(os.path.join(workdir, "config.json"), os.path.join(out, "config.json"))
    with open(os.path.join(out, DATASET_INFO_FILE), "w") as f:
        json.dump(dataset_info, f, indent=2, sort_keys=True)

    (batch,) = jax.export.symbolic_shape(BATCH)
    specs = input_specs(setup, batch, dataset_info.get("eval_image_size"))
    predict, forward = inference_functions(setup, variables)
    try:
        exported = jax.export.export(jax.jit(predict), platforms=tuple(platforms) or None)(specs)
    except _ReadsBeyondInputs:  # predict reads more of the batch than the model's inputs: export the outputs
        exported = jax.export.export(jax.jit(forward), platforms=tuple(platforms) or None)(specs)
    with open(os.path.join(out, EXPORTED_FILE), "wb") as f:
        f.write(exported.serialize())
    signature = {
        "inputs": _describe(specs),
        "outputs": _describe(jax.tree.unflatten(exported.out_tree, exported.out_avals)),
        "platforms": list(exported.platforms),
        "step": step,
        "model": config.model.name,
        "task": config.task,
        "bf16": bf16,
        "input_mean": list(config.input.get("mean") or ()),
        "input_std": list(config.input.get("std") or ()),
    }
    for side in ("inputs", "outputs"):  # "['images']" -> "images"
        signature[side] = {k.strip("[]'\""): v for k, v in signature[side].items()}
    with open(os.path.join(out, SIGNATURE_FILE), "w") as f:
        json.dump(signature, f, indent=2)
    with open(os.path.join(out, LOADER_FILE), "w") as f:
        f.write(LOADER)
    return signature


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS.workdir or not flags.FLAGS.out:
        _fail("--workdir and --out are required, e.g. --workdir=runs/quickstart --out=exports/quickstart")
    from clusterformer_jax.errors import ConfigError

    try:
        signature = export(
            flags.FLAGS.workdir,
            flags.FLAGS.out,
            bf16=flags.FLAGS.bf16,
            platforms=flags.FLAGS.platforms,
            format=flags.FLAGS.format,
        )
    except ConfigError as e:
        _fail(str(e))
    print(f"exported step {signature['step']} of {signature['model']} to {flags.FLAGS.out}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
