"""One run on one mesh: the train state, the model built with this machine's execution settings, the
optimizer, the state's shardings and the jitted init/train/eval functions (``build`` -> ``Setup``).

The step functions know nothing about the task beyond the ``tasks.base.Task`` protocol, and nothing about
the mesh beyond the shardings they are compiled with, so the same program runs on one device or a pod.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh, NamedSharding

from clusterformer_jax import optim
from clusterformer_jax import runtime
from clusterformer_jax import sharding
from clusterformer_jax.errors import ConfigError, ModelConfigError
from clusterformer_jax.models import registry as model_registry
from clusterformer_jax.tasks import registry as task_registry
from clusterformer_jax.tasks.base import Task


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; ``batch_stats`` is {} for models without BatchNorm."""

    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any
    rng: jax.Array


@flax.struct.dataclass
class Health:
    """The first step whose loss, gradient norm or new parameters were non-finite (-1: none yet)."""

    bad_step: jax.Array
    bad_loss: jax.Array

    @classmethod
    def empty(cls) -> Health:
        return cls(jnp.array(-1, jnp.int32), jnp.array(0.0, jnp.float32))


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.model.kwargs`` without unset (None) entries."""
    kwargs = config.model.kwargs.to_dict() if hasattr(config.model.kwargs, "to_dict") else dict(config.model.kwargs)
    return {k: v for k, v in kwargs.items() if v is not None}


def resolve_model_kwargs(config: ml_collections.ConfigDict, machine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``model_kwargs(config)`` plus this machine's execution settings (``runtime``) for the fields the model
    has and the config leaves unset. Resolved here, once, so the model never inspects the machine.
    ``machine`` (backend, num_devices, allocator) describes another machine, e.g. a TPU slice compiled for
    ahead of time."""
    try:
        fields = model_registry.model_fields(config.model.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return runtime.with_execution_settings(fields, model_kwargs(config), **(machine or {}))


def execution_fields(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The execution settings among resolved model kwargs (for the start-up log)."""
    return {k: kwargs[k] for k in runtime.EXECUTION_FIELDS if k in kwargs}


@dataclasses.dataclass
class Setup:
    """The model, task, optimizer, shardings and step functions of one run on one mesh."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model: nn.Module
    model_kwargs: dict[str, Any]  # as resolved for this machine, execution settings included
    task: Task
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    train_metrics_cls: type[clu_metrics.Collection]
    init_fn: Callable[[jax.Array], TrainState]
    train_step: Any
    predict_step: Any  # (state, batch) -> the task's fixed-shape predictions, sharded like the batch

    def init_state(self, seed: int) -> TrainState:
        """Fresh parameters and optimizer state, created directly in their shardings."""
        rng = jax.random.PRNGKey(seed)
        options = runtime.one_shot_compiler_options(jax.default_backend())
        return self.init_fn.lower(rng).compile(options)(rng)

    def empty_train_accumulator(self) -> tuple[clu_metrics.Collection, Health]:
        acc = (self.train_metrics_cls.empty(), Health.empty())
        return jax.device_put(acc, sharding.replicated(self.mesh))

    def abstract_with_shardings(self) -> TrainState:
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_shardings
        )


def split_micro_batches(array: jax.Array, num: int) -> jax.Array:
    """(B, ...) -> (num, B / num, ...), micro-batch j taking rows j, j + num, ...: each device's contiguous
    block of the batch splits evenly over the micro-batches, so no row moves between devices."""
    return jnp.swapaxes(array.reshape(array.shape[0] // num, num, *array.shape[1:]), 0, 1)


def merge_micro_values(values: jax.Array) -> jax.Array:
    """A metric value stacked over micro-batches back to the full batch's: per-example arrays (num, B / num,
    ...) to (B, ...) in batch order; per-micro-batch scalars (num,) to their mean."""
    if values.ndim == 1:
        return jnp.mean(values, axis=0)
    return jnp.swapaxes(values, 0, 1).reshape(-1, *values.shape[2:])


def build(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    dataset_info: Mapping[str, Any],
    *,
    total_steps: int,
    steps_per_epoch: float,
    machine: Mapping[str, Any] | None = None,
) -> Setup:
    """Creates the model, task, optimizer, state shardings and the jitted init/train/predict functions
    (with the execution settings of ``machine``, by default this process's)."""
    task = task_registry.create_task(config, dataset_info)
    kwargs = resolve_model_kwargs(config, machine)
    model = task.build_model(config.model.name, kwargs)
    tx, schedule = optim.create_optimizer_and_schedule(
        config.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch, global_batch_size=config.batch_size
    )

    def init_fn(rng: jax.Array) -> TrainState:
        params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
        variables = model.init({"params": params_rng, "dropout": dropout_rng}, **task.dummy_inputs(1), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.array(0, jnp.int32),
            params=params,
            opt_state=tx.init(params),
            batch_stats=variables.get("batch_stats", {}),
            rng=state_rng,
        )

    try:
        abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    except ModelConfigError as e:  # e.g. window counts that do not divide this input size
        raise ConfigError(f"model {config.model.name}: {e}") from None
    min_size = int(config.sharding.fsdp_min_size)
    repl = sharding.replicated(mesh)
    state_shardings = TrainState(
        step=repl,
        params=sharding.tree_shardings(abstract_state.params, mesh, min_size),
        opt_state=sharding.tree_shardings(abstract_state.opt_state, mesh, min_size),
        batch_stats=sharding.tree_shardings(abstract_state.batch_stats, mesh, min_size),
        rng=repl,
    )
    train_metrics_cls = clu_metrics.Collection.create(
        **task.train_metric_fields(),
        learning_rate=clu_metrics.LastValue.from_output("learning_rate"),
        grad_norm=clu_metrics.Average.from_output("grad_norm"),
        param_norm=clu_metrics.LastValue.from_output("param_norm"),
    )

    def apply(params, batch_stats, inputs: Mapping[str, jax.Array], train: bool, rng):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        if train and batch_stats:
            outputs, updated = model.apply(
                variables, **inputs, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
            )
            return outputs, updated["batch_stats"]
        rngs = {"dropout": rng} if train else {}
        return model.apply(variables, **inputs, train=train, rngs=rngs), batch_stats

    def loss_fn(params, batch_stats, batch, dropout_rng, loss_rng):
        outputs, new_batch_stats = apply(params, batch_stats, task.model_inputs(batch), True, dropout_rng)
        loss, values = task.loss_fn(outputs, batch, loss_rng)
        return loss, (values, new_batch_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum_steps, shards = int(config.grad_accum_steps), sharding.batch_divisor(mesh)
    if accum_steps < 1 or config.batch_size % (accum_steps * shards):
        raise ConfigError(
            f"grad_accum_steps={accum_steps} must be >= 1 and split batch_size={config.batch_size} into micro-batches "
            f"that are multiples of the mesh's {shards} batch shards; pick a divisor of {config.batch_size // shards}"
        )

    def accumulated_grads(params, batch_stats, batch, dropout_rng, loss_rng):
        """``grad_fn`` over ``accum_steps`` micro-batches, one at a time: the mean of their losses and
        gradients (the full batch's for a per-example-mean loss), per-example metric values in batch order."""
        micro = jax.tree.map(lambda a: split_micro_batches(a, accum_steps), batch)

        def body(carry, xs):
            grad_sum, loss_sum, batch_stats = carry
            i, micro_batch = xs
            rngs = (jax.random.fold_in(dropout_rng, i), jax.random.fold_in(loss_rng, i))
            (loss, (values, batch_stats)), grads = grad_fn(params, batch_stats, micro_batch, *rngs)
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, batch_stats), values

        init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), batch_stats)
        (grads, loss, batch_stats), values = jax.lax.scan(body, init, (jnp.arange(accum_steps), micro))
        grads = jax.tree.map(lambda g: g / accum_steps, grads)
        return (loss / accum_steps, (jax.tree.map(merge_micro_values, values), batch_stats)), grads

    def train_step(state: TrainState, batch: dict[str, jax.Array], acc):
        metrics_acc, health = acc
        step_rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, dropout_rng, loss_rng = jax.random.split(step_rng, 3)
        batch = task.prepare_train_batch(batch, aug_rng)
        compute = grad_fn if accum_steps == 1 else accumulated_grads
        (loss, (outputs, new_batch_stats)), grads = compute(
            state.params, state.batch_stats, batch, dropout_rng, loss_rng
        )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        param_norm = optax.tree.norm(params)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=new_batch_stats)
        metrics = train_metrics_cls.single_from_model_output(
            **outputs, learning_rate=schedule(state.step), grad_norm=grad_norm, param_norm=param_norm
        )
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        first_bad = (health.bad_step < 0) & ~finite
        health = Health(
            bad_step=jnp.where(first_bad, state.step + 1, health.bad_step),
            bad_loss=jnp.where(first_bad, loss.astype(jnp.float32), health.bad_loss),
        )
        return new_state, (metrics_acc.merge(metrics), health)

    def predict_step(state: TrainState, batch: dict[str, jax.Array]):
        outputs, _ = apply(state.params, state.batch_stats, task.model_inputs(batch), False, None)
        return task.predict(outputs, batch)

    batch_sharding = sharding.batch_sharding(mesh)
    return Setup(
        config=config,
        mesh=mesh,
        model=model,
        model_kwargs=kwargs,
        task=task,
        tx=tx,
        schedule=schedule,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        train_metrics_cls=train_metrics_cls,
        init_fn=jax.jit(init_fn, out_shardings=state_shardings),
        train_step=jax.jit(
            train_step,
            in_shardings=(state_shardings, batch_sharding, repl),
            out_shardings=(state_shardings, repl),
            donate_argnums=(0, 2),
        ),
        predict_step=jax.jit(
            predict_step, in_shardings=(state_shardings, batch_sharding), out_shardings=batch_sharding
        ),
    )
