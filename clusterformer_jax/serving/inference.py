"""A run's inference function with its variables as an argument: the model in evaluation mode and the task's
fixed-shape ``predict``, as exported (export.py, serving/saved_model.py) and as ``predict --workdir`` runs it."""

from __future__ import annotations

from typing import Any

# Chunking the clustering over groups depends on the batch size; a symbolic batch needs one loop-free program
# (an execution setting: same numbers, runtime.py).
BATCH_DEPENDENT_FIELDS = ("group_chunk", "group_chunk_bytes")


class _Names(dict):
    """A stand-in batch whose every key reads as its own name (to see which batch keys feed which input)."""

    def __missing__(self, key: str) -> str:
        return key


class ReadsBeyondInputs(LookupError):
    """``task.predict`` read a batch key the model's inputs do not provide (classification: the labels)."""


class _InputsBatch(dict):
    """The batch of the model's inputs; reading any other key raises `ReadsBeyondInputs` (not KeyError, so a
    KeyError from a bug inside ``predict`` is not mistaken for it)."""

    def __missing__(self, key: str):
        raise ReadsBeyondInputs(key)


def batch_from_inputs(task: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch that ``task.model_inputs`` maps onto ``inputs`` (e.g. 'pixel_mask' <- 'image_mask')."""
    return _InputsBatch({source: inputs[name] for name, source in task.model_inputs(_Names()).items()})


def serving_apply(setup: Any, per_example: bool = False):
    """``apply(variables, inputs) -> outputs``: the model in evaluation mode and the task's fixed-shape
    ``predict`` (or ``{'logits': ...}`` when ``predict`` needs labels), plus every input that is not a model
    input (the image placement the postprocessing reads), passed through.

    ``per_example``: a ``lax.map`` over the batch, each image at batch size 1, so only the loop's trip count
    depends on the symbolic batch. TF 2.21 cannot refine the shapes inside the decompositions of CHLO ops
    (``chlo.erf`` of the exact GELU, ``chlo.top_k``) when their operands carry the symbolic batch ("op has
    dynamic shapes" at run time); with static shapes inside the loop it runs them."""
    import jax
    import jax.numpy as jnp

    kwargs = dict(setup.model_kwargs)
    for field in BATCH_DEPENDENT_FIELDS:  # one loop-free program for the symbolic batch
        if field in kwargs:
            kwargs[field] = None
    task = setup.task
    model = task.build_model(setup.config.model.name, kwargs)
    reference = jax.tree.map(lambda a: a.dtype, setup.abstract_state.params)
    model_keys = tuple(task.dummy_inputs(1))

    def apply(variables, inputs):
        params = jax.tree.map(lambda p, dtype: jnp.asarray(p).astype(dtype), variables["params"], reference)
        full = {"params": params, **{k: v for k, v in variables.items() if k != "params"}}
        model_inputs = {k: inputs[k] for k in model_keys}
        outputs = model.apply(full, **model_inputs, train=False)
        try:
            predictions = dict(task.predict(outputs, batch_from_inputs(task, model_inputs)))
        except ReadsBeyondInputs:
            predictions = {"logits": outputs}
        return predictions | {k: v for k, v in inputs.items() if k not in model_keys}

    def one_by_one(variables, inputs):
        def one(example):
            out = apply(variables, jax.tree.map(lambda x: x[None], example))
            return jax.tree.map(lambda x: x[0], out)

        return jax.lax.map(one, inputs)

    return one_by_one if per_example else apply
