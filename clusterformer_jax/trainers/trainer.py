"""The shared training loop: ``train_and_evaluate(config, workdir)`` for every task and model.

Setup order: mesh -> input pipeline -> task and model (``setup.build``: abstract state via ``jax.eval_shape``,
shardings, ``jit(init)`` with ``out_shardings``) -> restore-or-init (``restore``) -> loop. The train step is
compiled once ahead of time; the loop only syncs with the host at log, eval and checkpoint steps.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from etils import epath
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh

from clusterformer_jax import checkpointing
from clusterformer_jax import preemption
from clusterformer_jax import runtime
from clusterformer_jax import sharding
from clusterformer_jax import workdir_lock
from clusterformer_jax.errors import ConfigError
from clusterformer_jax.tasks import registry as task_registry
from clusterformer_jax.trainers import progress
from clusterformer_jax.trainers.progress import StepClock
from clusterformer_jax.trainers.restore import restore_or_init
from clusterformer_jax.trainers.setup import Setup, TrainState, build, execution_fields
from clusterformer_jax.trainers.summaries import EventWriter, WorkdirWriter

DATASET_INFO_FILE = "dataset_info.json"  # the dataset's description, beside config.json
RESULT_KEYS = ("steps", "seconds")  # plus the task's headline numbers (Task.summary)


def resolve_run_lengths(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, float]:
    """(total train steps, steps per epoch) from num_train_steps or num_epochs."""
    steps_per_epoch = num_train / config.batch_size
    if config.num_train_steps > 0:
        return int(config.num_train_steps), steps_per_epoch
    if config.num_epochs <= 0:
        raise ConfigError("set num_train_steps > 0 or num_epochs > 0")
    return max(int(config.num_epochs * steps_per_epoch), 1), steps_per_epoch


def _jsonable(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _eval_batch_size(config: ml_collections.ConfigDict) -> int:
    return int(config.eval_batch_size) if config.eval_batch_size > 0 else int(config.batch_size)


def _check_positive_multiple(name: str, value: int, divisor: int, what: str) -> None:
    if value <= 0 or value % divisor:
        raise ConfigError(f"{name}={value} must be a positive multiple of {divisor} ({what})")


def _validate(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    shards, processes = sharding.batch_divisor(mesh), jax.process_count()
    why = f"the batch is split over mesh data*fsdp={shards} shards and {processes} process(es)"
    _check_positive_multiple("batch_size", config.batch_size, math.lcm(shards, processes), why)
    _check_positive_multiple("eval_batch_size", _eval_batch_size(config), math.lcm(shards, processes), why)
    if config.log_every_steps <= 0:
        raise ConfigError(f"log_every_steps must be positive, got {config.log_every_steps}")


def _shard(batch: Mapping[str, np.ndarray], setup: Setup) -> dict[str, jax.Array]:
    return sharding.shard_batch(batch, setup.batch_sharding)


def evaluate(setup: Setup, state: TrainState, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """One pass of the task's evaluator: the jitted ``predict`` on every batch, then ``update`` with this
    process's rows (padded rows, mask 0, are the evaluator's to skip) and ``compute`` across processes.

    The result includes 'num_examples', the number of real rows scored (the eval split size when nothing
    failed to load).
    """
    evaluator = setup.task.create_evaluator()
    spec = sharding.batch_partition_spec()
    seen = 0
    for batch in batches:
        predictions = setup.predict_step(state, _shard(batch, setup))
        local = multihost_utils.global_array_to_host_local_array(predictions, setup.mesh, spec)
        evaluator.update(jax.tree.map(np.asarray, local), batch)
        seen += 1
    if not seen:
        raise ConfigError("the eval split produced no batches")
    return dict(evaluator.compute())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint) and returns the final eval metrics.

    Process 0 holds the workdir's lock (``workdir_lock``) from before anything is written until the end. A
    signal before the first step stops the run at the next safe point: ``{'preempted': True, 'steps': step,
    'saved': False}`` (nothing new to save)."""
    start_time = time.time()
    if config.compilation_cache_dir and jax.config.jax_compilation_cache_dir != config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
        compilation_cache.reset_cache()  # Re-read the directory even if something compiled already.
    workdir_path = epath.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    with workdir_lock.hold(workdir), preemption.PreemptionGuard() as guard:
        return _prepare_and_run(config, workdir, guard, start_time)


def _stopped_before_training(guard: preemption.PreemptionGuard, step: int | None) -> dict[str, Any]:
    logging.warning("Stopped by %s before the first step of this run; nothing new to save", guard.signal_name)
    return {"preempted": True, "steps": step, "saved": False}


def _prepare_and_run(
    config: ml_collections.ConfigDict, workdir: str, guard: preemption.PreemptionGuard, start_time: float
) -> dict[str, Any]:
    workdir_path = epath.Path(workdir)
    is_primary = jax.process_index() == 0
    if is_primary:
        (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

    mesh = sharding.create_mesh(config.mesh)
    _validate(config, mesh)
    logging.info("Mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    if jax.default_backend() == "cpu" and runtime.host_allocator() == "glibc":
        logging.info("Host allocator is glibc malloc; %s", runtime.TCMALLOC_HINT)

    input_pipeline = task_registry.input_module(config)
    dataset_info = input_pipeline.get_dataset_info(config.input)
    total_steps, steps_per_epoch = resolve_run_lengths(config, int(dataset_info["num_train"]))
    if is_primary:  # what the export needs to rebuild the model without the dataset
        text = json.dumps(dict(dataset_info), indent=2, sort_keys=True, default=_jsonable)
        (workdir_path / DATASET_INFO_FILE).write_text(text + "\n")
    if guard.stop_requested:  # a signal during data preparation
        return _stopped_before_training(guard, None)
    train_iter = input_pipeline.create_train_iterator(
        config.input, seed=config.seed, global_batch_size=config.batch_size
    )
    setup = build(config, mesh, dataset_info, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    logging.info(
        "Model %s; execution settings for this machine: %s",
        config.model.name,
        execution_fields(setup.model_kwargs) or "none (the model has no execution fields)",
    )

    ckpt = checkpointing.Checkpointer(
        checkpointing.checkpoint_dir(workdir),
        max_to_keep=config.checkpoint.keep,
        save_interval_steps=config.checkpoint.every_steps,
        async_save=config.checkpoint.async_save,
    )
    writer = WorkdirWriter(EventWriter(workdir if is_primary else None), workdir, ckpt)
    clock = StepClock()
    try:
        return _run(
            config,
            workdir_path,
            setup,
            ckpt,
            writer,
            train_iter,
            clock,
            total_steps,
            steps_per_epoch,
            start_time,
            guard,
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
    writer: WorkdirWriter,
    train_iter: Iterator[Mapping[str, np.ndarray]],
    clock: StepClock,
    total_steps: int,
    steps_per_epoch: float,
    start_time: float,
    guard: preemption.PreemptionGuard,
) -> dict[str, Any]:
    is_primary = jax.process_index() == 0
    state, source = restore_or_init(config, setup, ckpt, train_iter)
    step = int(jax.device_get(state.step))
    if guard.stop_requested:  # a signal while building, initialising or restoring
        return _stopped_before_training(guard, step)
    logging.info(
        "Train state from %s; step %d of %d (%.1f steps per epoch)", source, step, total_steps, steps_per_epoch
    )
    logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(state.params, include_stats=False))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    if step == 0:
        writer.write_hparams(progress.flatten_hparams(config.to_dict()))

    eval_every = int(config.eval_every_steps)
    if eval_every < 0:
        eval_every = max(int(round(steps_per_epoch)), 1)
    eval_batch = _eval_batch_size(config)

    def eval_batches():
        return task_registry.input_module(config).create_eval_iterator(config.input, global_batch_size=eval_batch)

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
            logging.info("Compiling the train step")
            train_step = setup.train_step.lower(state, batch, acc).compile()
            logging.info("Compiled train step; memory: %s", progress.memory_report(train_step))
            if guard.stop_requested:  # a signal while compiling: stop before the first step
                return _stopped_before_training(guard, step)
            guard.training = True  # from now on the first signal saves the step in flight
            log_time, data_wait, input_stall = time.time(), 0.0, 0.0  # keep compilation out of the rates
        state, acc = train_step(state, batch, acc)
        step += 1
        clock.dispatched(step, jnp.copy(state.step))  # state itself is donated to the next step

        preempted = guard.should_stop(step, ckpt.reached_preemption)
        if step % config.log_every_steps == 0 or step == total_steps or preempted:
            progress.check_health(acc[1], last_good, config)
            values = {f"train_{k}": float(v) for k, v in acc[0].compute().items()}
            now = time.time()
            window = max(now - log_time, 1e-9)
            values["train_data_wait_fraction"] = data_wait / window
            values["train_input_stall_fraction"] = input_stall / window
            rate = values["train_steps_per_second"] = (step - log_step) / window
            writer.write_scalars(step, values)
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
                progress.format_duration(eta),
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
            progress.check_health(acc[1], last_good, config)
            if ckpt.save(step, state, train_iter, force=True):
                last_good = step
        if preempted:
            ckpt.wait()
            if jax.process_count() > 1:  # nobody exits (and gets its peers killed) before process 0 committed
                multihost_utils.sync_global_devices("preempted_checkpoint_committed")
            logging.warning(
                "Preempted (%s) at step %d: checkpoint committed; rerun the same command to resume.",
                guard.signal_name or "SIGTERM",
                step,
            )
            return {"preempted": True, "steps": step}

        if eval_every > 0 and step % eval_every == 0 and step < total_steps:
            eval_start = time.time()
            metrics = evaluate(setup, state, eval_batches())
            log_time += time.time() - eval_start  # keep eval time out of the train steps/s
            writer.write_scalars(step, {f"eval_{k}": v for k, v in metrics.items()})
            logging.info("eval at step %d: %s", step, progress.format_metrics(metrics))

    ckpt.wait()
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
    logging.info("Final eval at step %d: %s", step, progress.format_metrics(metrics))
    if is_primary:
        print(f"final eval (step {step}): " + progress.format_metrics(metrics), flush=True)
        progress.write_json(workdir / "results.json", results)
    return results
