"""The shared training loop: ``train_and_evaluate(config, workdir)``.

Setup order: mesh -> input pipeline -> task and model -> abstract state (``jax.eval_shape``) -> shardings ->
``jit(init)`` with ``out_shardings`` -> restore-or-init (workdir checkpoint, then ``config.resume``, then
``config.init_from`` for parameters only, else from scratch) -> loop. The train step is compiled once ahead
of time; the loop only syncs with the host at log, eval and checkpoint steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import metrics as clu_metrics
from clu import parameter_overview
from clu import periodic_actions
from etils import epath
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh, NamedSharding

from clusterformer_jax import checkpointing
from clusterformer_jax import optim
from clusterformer_jax import runtime
from clusterformer_jax import sharding
from clusterformer_jax.data import pipeline as input_pipeline
from clusterformer_jax.models import registry as model_registry
from clusterformer_jax.models.clustering import ModelConfigError
from clusterformer_jax.tasks import registry as task_registry
from clusterformer_jax.tasks.base import Task
from clusterformer_jax.errors import ConfigError, NonFiniteError

RESULT_KEYS = ("top1", "top5", "loss", "steps", "seconds")


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


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    try:
        return model_registry.create_model(config.model.name, num_classes=num_classes, **model_kwargs(config))
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclasses.dataclass
class Setup:
    """The model, task, optimizer, shardings and step functions of one run on one mesh."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model: nn.Module
    task: Task
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    image_shape: tuple[int, int, int]
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    train_metrics_cls: type[clu_metrics.Collection]
    eval_metrics_cls: type[clu_metrics.Collection]
    init_fn: Callable[[jax.Array], TrainState]
    train_step: Any
    eval_step: Any

    def init_state(self, seed: int) -> TrainState:
        """Fresh parameters and optimizer state, created directly in their shardings."""
        return self.init_fn(jax.random.PRNGKey(seed))

    def empty_train_accumulator(self) -> tuple[clu_metrics.Collection, Health]:
        acc = (self.train_metrics_cls.empty(), Health.empty())
        return jax.device_put(acc, sharding.replicated(self.mesh))

    def abstract_with_shardings(self) -> TrainState:
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_shardings
        )


def build(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    dataset_info: Mapping[str, Any],
    *,
    total_steps: int,
    steps_per_epoch: float,
) -> Setup:
    """Creates the model, task, optimizer, state shardings and the jitted init/train/eval functions."""
    task = task_registry.create_task(config, dataset_info)
    model = create_model(config, int(dataset_info["num_classes"]))
    tx, schedule = optim.create_optimizer_and_schedule(
        config.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch, global_batch_size=config.batch_size
    )
    size = int(dataset_info["image_size"])
    image_shape = (size, size, 3)

    def init_fn(rng: jax.Array) -> TrainState:
        params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
        variables = model.init(
            {"params": params_rng, "dropout": dropout_rng}, jnp.zeros((1,) + image_shape, jnp.float32), train=False
        )
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
    eval_metrics_cls = clu_metrics.Collection.create(**task.eval_metric_fields())

    def apply(params, batch_stats, images, train: bool, rng):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        if train and batch_stats:
            logits, updated = model.apply(variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
            return logits, updated["batch_stats"]
        rngs = {"dropout": rng} if train else {}
        return model.apply(variables, images, train=train, rngs=rngs), batch_stats

    def train_step(state: TrainState, batch: dict[str, jax.Array], acc):
        metrics_acc, health = acc
        step_rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, dropout_rng = jax.random.split(step_rng)
        batch = task.prepare_train_batch(batch, aug_rng)

        def loss_fn(params):
            logits, new_batch_stats = apply(params, state.batch_stats, batch["image"], True, dropout_rng)
            loss, outputs = task.loss_fn(logits, batch)
            return loss, (outputs, new_batch_stats)

        (loss, (outputs, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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

    def eval_step(state: TrainState, batch: dict[str, jax.Array]):
        logits, _ = apply(state.params, state.batch_stats, batch["image"], False, None)
        return eval_metrics_cls.single_from_model_output(**task.eval_outputs(logits, batch))

    batch_sharding = sharding.batch_sharding(mesh)
    return Setup(
        config=config,
        mesh=mesh,
        model=model,
        task=task,
        tx=tx,
        schedule=schedule,
        image_shape=image_shape,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        train_metrics_cls=train_metrics_cls,
        eval_metrics_cls=eval_metrics_cls,
        init_fn=jax.jit(init_fn, out_shardings=state_shardings),
        train_step=jax.jit(
            train_step,
            in_shardings=(state_shardings, batch_sharding, repl),
            out_shardings=(state_shardings, repl),
            donate_argnums=(0, 2),
        ),
        eval_step=jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding), out_shardings=repl),
    )


# ----------------------------------------------------------------------------------------------------------
# Run-level helpers.


def _check_positive_multiple(name: str, value: int, divisor: int, what: str) -> None:
    if value <= 0 or value % divisor:
        raise ConfigError(f"{name}={value} must be a positive multiple of {divisor} ({what})")


def resolve_run_lengths(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, float]:
    """(total train steps, steps per epoch) from num_train_steps or num_epochs."""
    steps_per_epoch = num_train / config.batch_size
    if config.num_train_steps > 0:
        return int(config.num_train_steps), steps_per_epoch
    if config.num_epochs <= 0:
        raise ConfigError("set num_train_steps > 0 or num_epochs > 0")
    return max(int(config.num_epochs * steps_per_epoch), 1), steps_per_epoch


def _eval_batch_size(config: ml_collections.ConfigDict) -> int:
    return int(config.eval_batch_size) if config.eval_batch_size > 0 else int(config.batch_size)


def init_params_from(path: str, setup: Setup, state: TrainState) -> TrainState:
    """Loads parameters (and BatchNorm statistics) from another run's checkpoint for fine-tuning.

    Leaves whose shape differs from this model (e.g. a classifier head for another number of classes) or
    that the checkpoint lacks keep their fresh initialisation and are logged.
    """
    if path.endswith(".safetensors"):
        return _init_params_from_safetensors(path, setup, state)
    ckpt, step = checkpointing.open_readonly(path)
    target = setup.abstract_with_shardings()
    wanted = {"params": target.params}
    if state.batch_stats:
        wanted["batch_stats"] = target.batch_stats
    stored = ckpt.item_shapes(step)
    keep, skipped = {}, []
    for field, subtree in wanted.items():
        stored_field = stored.get(field, {}) if isinstance(stored, Mapping) else {}
        flat = flax.traverse_util.flatten_dict(subtree, sep="/")
        stored_flat = flax.traverse_util.flatten_dict(stored_field, sep="/") if stored_field else {}
        kept = {k: v for k, v in flat.items() if k in stored_flat and tuple(stored_flat[k]) == tuple(v.shape)}
        skipped += [f"{field}/{k}" for k in flat if k not in kept]
        if kept:
            keep[field] = flax.traverse_util.unflatten_dict(kept, sep="/")
    if not keep:
        raise ConfigError(f"init_from={path!r}: no parameter of this model matches the checkpoint")
    restored = ckpt.restore_subtree(keep, step)
    ckpt.close()
    if skipped:
        logging.warning(
            "init_from: %d leaves keep their fresh init (missing or shape differs): %s",
            len(skipped),
            ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
        )
    replaced = {}
    for field in keep:
        merged = flax.traverse_util.flatten_dict(getattr(state, field), sep="/")
        merged.update(flax.traverse_util.flatten_dict(restored[field], sep="/"))
        replaced[field] = flax.traverse_util.unflatten_dict(merged, sep="/")
    logging.info("Initialised %s from %s (step %d)", ", ".join(keep), path, step)
    return state.replace(**replaced)


def _init_params_from_safetensors(path: str, setup: Setup, state: TrainState) -> TrainState:
    """Parameters from a converted released checkpoint (``convert/*`` writes Flax-path keys)."""
    from clusterformer_jax.convert.mmcls_clusterformer import load_flax_params

    stored = flax.traverse_util.flatten_dict(load_flax_params(path), sep="/")
    current = flax.traverse_util.flatten_dict(state.params, sep="/")
    shardings = flax.traverse_util.flatten_dict(setup.state_shardings.params, sep="/")
    kept = {
        k: jax.device_put(stored[k].astype(v.dtype), shardings[k])
        for k, v in current.items()
        if k in stored and stored[k].shape == v.shape
    }
    if not kept:
        raise ConfigError(f"init_from={path!r}: no parameter of this model matches the file")
    skipped = [k for k in current if k not in kept]
    if skipped:
        logging.warning(
            "init_from: %d leaves keep their fresh init (missing or shape differs): %s",
            len(skipped),
            ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
        )
    current.update(kept)
    logging.info("Initialised %d parameter leaves from %s", len(kept), path)
    return state.replace(params=flax.traverse_util.unflatten_dict(current, sep="/"))


def restore_or_init(
    config: ml_collections.ConfigDict, setup: Setup, ckpt: checkpointing.Checkpointer, train_iter: Any
) -> tuple[TrainState, str]:
    """The train state from (in order) the workdir's checkpoint, ``config.resume``, ``config.init_from``
    (parameters only) or scratch; the iterator is restored alongside a full state."""
    abstract = setup.abstract_with_shardings()
    if ckpt.latest_step() is not None:
        return ckpt.restore(abstract, train_iter), f"workdir checkpoint (step {ckpt.latest_step()})"
    if config.resume:
        source, step = checkpointing.open_readonly(config.resume)
        state = source.restore(abstract, train_iter, step)
        source.close()
        return state, f"resume={config.resume} (step {step})"
    state = setup.init_state(config.seed)
    if config.init_from:
        return init_params_from(config.init_from, setup, state), f"init_from={config.init_from}"
    return state, "scratch"


def _memory_report(compiled: Any) -> str:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # Not every backend implements it.
        stats = None
    if stats is None:
        return "unavailable on this backend"
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    parts = [
        f'{f.replace("_size_in_bytes", "")}={getattr(stats, f) / 2**20:.1f}MiB' for f in fields if hasattr(stats, f)
    ]
    return ", ".join(parts)


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _check_health(health: Health, last_good_step: int | None, config: ml_collections.ConfigDict) -> None:
    bad_step = int(jax.device_get(health.bad_step))
    if bad_step < 0:
        return
    value = float(jax.device_get(health.bad_loss))
    where = f"last good checkpoint: step {last_good_step}" if last_good_step is not None else "no checkpoint saved"
    clip = config.optim.grad_clip_norm
    hint = "lower optim.base_lr, " + (
        f"tighten optim.grad_clip_norm (now {clip})"
        if clip > 0
        else "enable gradient clipping (optim.grad_clip_norm=1.0)"
    )
    hint += " or lengthen the warmup"
    raise NonFiniteError(
        f"training diverged at step {bad_step}: non-finite loss, gradient norm or parameter norm "
        f"(loss={value:.6g}); stopped, {where}; hint: {hint}"
    )


def _write_json(path: epath.Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _shard(batch: Mapping[str, np.ndarray], setup: Setup) -> dict[str, jax.Array]:
    return sharding.shard_batch(batch, setup.batch_sharding)


class StepClock:
    """Measures input stalls: time the device sat idle because the next batch was not there yet.

    Steps are dispatched asynchronously, so the time the loop blocks in ``next(train_iter)`` mostly
    overlaps the previous step's execution. A thread blocks on each dispatched step's output and records
    when it finished; the stall before step k+1 is the part of the wait for its batch after step k finished.
    """

    def __init__(self):
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._finished: tuple[int, float] = (-1, 0.0)  # (last finished step, when)
        self._thread = threading.Thread(target=self._watch, name="step-clock", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while (item := self._pending.get()) is not None:
            step, output = item
            try:
                jax.block_until_ready(output)
            except Exception as e:  # pylint: disable=broad-except
                logging.warning("input stall accounting stopped: %s", e)
                return
            with self._lock:
                self._finished = (step, time.time())

    def dispatched(self, step: int, output: Any) -> None:
        """``output`` must become ready when the step finishes and must not be donated to a later step."""
        self._pending.put((step, output))

    def stall(self, previous_step: int, wait_start: float, wait_end: float) -> float:
        """Idle device time within [wait_start, wait_end] while waiting for the batch after ``previous_step``."""
        with self._lock:
            step, finished = self._finished
        if step != previous_step:  # still running when the batch arrived (or not yet seen to finish)
            return 0.0
        return max(0.0, wait_end - max(finished, wait_start))

    def close(self) -> None:
        self._pending.put(None)
        self._thread.join()


_merge_metrics = jax.jit(lambda a, b: a.merge(b))


def evaluate(setup: Setup, state: TrainState, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Accumulates eval metrics over one pass; padded rows (mask 0) count for nothing.

    Adds 'num_examples', the number of unmasked rows seen (the eval split size when nothing failed to load).
    """
    acc = None
    for batch in batches:
        metrics = setup.eval_step(state, _shard(batch, setup))
        acc = metrics if acc is None else _merge_metrics(acc, metrics)
    if acc is None:
        raise ConfigError("the eval split produced no batches")
    result: dict[str, Any] = {k: float(v) for k, v in acc.compute().items()}
    for field in dataclasses.fields(acc):
        metric = getattr(acc, field.name)
        if isinstance(metric, clu_metrics.Average):
            result["num_examples"] = int(metric.count)
            break
    return result


def _validate(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    shards, processes = sharding.batch_divisor(mesh), jax.process_count()
    why = f"the batch is split over mesh data*fsdp={shards} shards and {processes} process(es)"
    _check_positive_multiple("batch_size", config.batch_size, math.lcm(shards, processes), why)
    _check_positive_multiple("eval_batch_size", _eval_batch_size(config), math.lcm(shards, processes), why)
    if config.log_every_steps <= 0:
        raise ConfigError(f"log_every_steps must be positive, got {config.log_every_steps}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint) and returns the final eval metrics."""
    start_time = time.time()
    if config.compilation_cache_dir and jax.config.jax_compilation_cache_dir != config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        compilation_cache.reset_cache()  # Re-read the directory even if something compiled already.
    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    is_primary = jax.process_index() == 0
    if is_primary:
        (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

    mesh = sharding.create_mesh(config.mesh)
    _validate(config, mesh)
    logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    if jax.default_backend() == "cpu" and runtime.host_allocator() == "glibc":
        logging.info("Host allocator is glibc malloc; %s", runtime.TCMALLOC_HINT)

    dataset_info = input_pipeline.get_dataset_info(config.input)
    total_steps, steps_per_epoch = resolve_run_lengths(config, int(dataset_info["num_train"]))
    train_iter = input_pipeline.create_train_iterator(
        config.input, seed=config.seed, global_batch_size=config.batch_size
    )
    setup = build(config, mesh, dataset_info, total_steps=total_steps, steps_per_epoch=steps_per_epoch)

    ckpt = checkpointing.Checkpointer(
        checkpointing.checkpoint_dir(workdir),
        max_to_keep=config.checkpoint.keep,
        save_interval_steps=config.checkpoint.every_steps,
        async_save=config.checkpoint.async_save,
    )
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_primary, asynchronous=True)
    clock = StepClock()
    try:
        return _run(
            config, workdir_path, setup, ckpt, writer, train_iter, clock, total_steps, steps_per_epoch, start_time
        )
    finally:
        clock.close()
        ckpt.close()
        writer.flush()
        writer.close()
        if hasattr(train_iter, "close"):
            train_iter.close()


def _run(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    setup: Setup,
    ckpt: checkpointing.Checkpointer,
    writer: metric_writers.MetricWriter,
    train_iter: Iterator[Mapping[str, np.ndarray]],
    clock: StepClock,
    total_steps: int,
    steps_per_epoch: float,
    start_time: float,
) -> dict[str, Any]:
    is_primary = jax.process_index() == 0
    state, source = restore_or_init(config, setup, ckpt, train_iter)
    step = int(jax.device_get(state.step))
    logging.info(
        "Train state from %s; step %d of %d (%.1f steps per epoch)", source, step, total_steps, steps_per_epoch
    )
    logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(state.params, include_stats=False))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    if step == 0:
        writer.write_hparams(_flatten(config.to_dict()))

    eval_every = int(config.eval_every_steps)
    if eval_every < 0:
        eval_every = max(int(round(steps_per_epoch)), 1)
    eval_batch = _eval_batch_size(config)

    def eval_batches():
        return input_pipeline.create_eval_iterator(config.input, global_batch_size=eval_batch)

    report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
    acc = setup.empty_train_accumulator()
    train_step = None
    last_good = ckpt.latest_step()
    log_time, log_step = time.time(), step
    loop_start_step = step
    preempted = False

    # Since the last log step: seconds the loop blocked on the input pipeline (mostly overlapping the running
    # step, which was dispatched asynchronously) and seconds the device sat idle for lack of a batch.
    data_wait = input_stall = 0.0
    run_totals = dict(seconds=0.0, steps=0, wait=0.0, stall=0.0)  # over the logged windows of this run
    while step < total_steps:
        wait_start = time.time()
        batch = _shard(next(train_iter), setup)
        wait_end = time.time()
        data_wait += wait_end - wait_start
        input_stall += clock.stall(step, wait_start, wait_end)
        if train_step is None:
            train_step = setup.train_step.lower(state, batch, acc).compile()
            logging.info("Compiled train step; memory: %s", _memory_report(train_step))
            log_time, data_wait, input_stall = time.time(), 0.0, 0.0  # keep compilation out of the rates
        state, acc = train_step(state, batch, acc)
        step += 1
        clock.dispatched(step, jnp.copy(state.step))  # state itself is donated to the next step
        report_progress(step, time.time())

        preempted = ckpt.reached_preemption(step)
        if step % config.log_every_steps == 0 or step == total_steps or preempted:
            _check_health(acc[1], last_good, config)
            values = {f"train_{k}": float(v) for k, v in acc[0].compute().items()}
            now = time.time()
            window = max(now - log_time, 1e-9)
            values["train_data_wait_fraction"] = data_wait / window
            values["train_input_stall_fraction"] = input_stall / window
            writer.write_scalars(step, values)
            rate = (step - log_step) / window
            eta = (total_steps - step) / rate if rate > 0 else float("inf")
            logging.info(
                "step %d/%d  loss %.4f  lr %.3g  %.2f steps/s  input stall %.1f%% (waited %.1f%%)  ETA %s",
                step,
                total_steps,
                values["train_loss"],
                values["train_learning_rate"],
                rate,
                100 * values["train_input_stall_fraction"],
                100 * values["train_data_wait_fraction"],
                _format_duration(eta),
            )
            for key, value in (
                ("seconds", window),
                ("steps", step - log_step),
                ("wait", data_wait),
                ("stall", input_stall),
            ):
                run_totals[key] += value
            log_time, log_step, data_wait, input_stall = now, step, 0.0, 0.0
            acc = setup.empty_train_accumulator()

        if ckpt.should_save(step) or step == total_steps or preempted:
            _check_health(acc[1], last_good, config)
            if ckpt.save(step, state, train_iter, force=True):
                last_good = step
        if preempted:
            logging.warning("Preemption signalled at step %d: checkpoint saved, exiting.", step)
            ckpt.wait()
            return {"preempted": True, "steps": step}

        if eval_every > 0 and step % eval_every == 0 and step < total_steps:
            eval_start = time.time()
            with report_progress.timed("eval"):
                metrics = evaluate(setup, state, eval_batches())
            log_time += time.time() - eval_start  # keep eval time out of the train steps/s
            writer.write_scalars(step, {f"eval_{k}": v for k, v in metrics.items()})
            logging.info("eval at step %d: %s", step, _format_metrics(metrics))

    ckpt.wait()
    with report_progress.timed("eval"):
        metrics = evaluate(setup, state, eval_batches())
    writer.write_scalars(step, {f"eval_{k}": v for k, v in metrics.items()})
    seconds = time.time() - start_time
    results = {
        **setup.task.summary(metrics),
        "steps": step,
        "seconds": seconds,
        "eval_num_examples": metrics.get("num_examples"),
        "dataset": config.input.dataset,
        "model": config.model.name,
        "num_params": num_params,
        "global_batch_size": int(config.batch_size),
        "num_devices": setup.mesh.size,
        "mesh": dict(setup.mesh.shape),
        "train_steps_this_run": step - loop_start_step,
        # training only (no compilation, eval or checkpoint waits at the end)
        "train_steps_per_second": run_totals["steps"] / max(run_totals["seconds"], 1e-9),
        "train_input_stall_fraction": run_totals["stall"] / max(run_totals["seconds"], 1e-9),
        "train_data_wait_fraction": run_totals["wait"] / max(run_totals["seconds"], 1e-9),
    }
    logging.info("Final eval at step %d: %s", step, _format_metrics(metrics))
    if is_primary:
        print(f"final eval (step {step}): " + _format_metrics(metrics), flush=True)
        _write_json(workdir / "results.json", results)
    return results


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items()))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
