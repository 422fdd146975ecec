"""The pretraining loop of every method (config.method.name): setup, loop, finish.

`train_and_evaluate` reads top to bottom: set up the run (`_setup`: config.json,
devices, the input pipeline, the model and optimizer, a fresh or restored
state), run the loop (`_train_loop`: one step, then the periodic work of
simclr_jax.hooks: host sync and logging, checkpoints, the kNN monitor,
preemption), and finish (results, the kNN/probe evaluation, results.json).

Resume order matters and is why setup happens in this sequence: the restored
step decides where the input pipeline starts, so the checkpoint step is read
before the pipeline is built; the data order and every augmentation are pure
functions of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would.
"""

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import ml_collections as mlc
import optax

from simclr_jax import (
    checkpoint,
    config_checks,
    distributed,
    files,
    hooks,
    methods,
    models,
    optim,
    sharding,
    steps,
)
from simclr_jax.data import pipeline, sources
from simclr_jax.eval import monitor
from simclr_jax.metrics import MetricLogger


@dataclasses.dataclass(frozen=True)
class Run:
    """What the loop needs, built once from the config and the data (`_build_run`).

    Attributes:
      model: the pretraining model (encoder, the method's heads, online probe).
      method: the method's step object (methods.from_config).
      tx: the optimizer.
      schedule: step -> learning rate.
      mesh: the 1-D data-parallel mesh over `devices`.
      devices: the devices this run trains on (all processes').
      parallelism: 'shard_map' or 'pmap' (config.train.parallelism).
      micro_batch_per_device: examples per micro-batch on each device; None = one pass.
      total_steps: steps of the whole run.
      warmup_steps: linear warmup steps of the schedule.
      steps_per_epoch: steps per pass over the training split.
      info: the training pipeline's facts (examples, classes, batch sizes).
      conv: the encoder's convolution class (models.build_model's `conv`).
      monitor_every_steps: the kNN monitor's period in steps (0: only at the end).
    """

    model: nn.Module
    method: object
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    devices: list[jax.Device]
    parallelism: str
    micro_batch_per_device: int | None
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    info: pipeline.PipelineInfo
    conv: models.ModuleDef = nn.Conv
    monitor_every_steps: int = 0

    def to_device(self, batch: dict) -> dict:
        """A host batch as the step takes it (global arrays, or stacked per device for pmap)."""
        if self.parallelism == "pmap":
            return sharding.shard_for_pmap(batch, sharding.local_device_count(self.devices))
        return sharding.make_global_batch(batch, self.mesh)

    def to_host_state(self, state: steps.TrainState) -> steps.TrainState:
        """The state without pmap's device axis (unchanged under shard_map)."""
        return sharding.unreplicate_from_pmap(state) if self.parallelism == "pmap" else state


def _select_devices(config: mlc.ConfigDict) -> list[jax.Device]:
    devices = sharding.select_devices(config.train.num_devices)
    config_checks.check_batch_split(
        config.train.batch_size, len(devices), jax.process_count(), "train.batch_size"
    )
    return devices


def _build_run(
    config: mlc.ConfigDict,
    data_info: pipeline.PipelineInfo,
    devices: list[jax.Device],
    mesh: jax.sharding.Mesh,
    conv: models.ModuleDef,
) -> Run:
    """Converts the config's epochs to steps and builds the model and optimizer (no state)."""
    monitor_epochs = config.eval.get("every_epochs", 0.0)
    if config.eval.knn or monitor_epochs:
        config_checks.check_batch_split(
            config.eval.batch_size, len(devices), jax.process_count(), "eval.batch_size"
        )
    micro_per_device = config_checks.micro_batch_per_device(
        config.train.get("micro_batch_size", 0), config.train.batch_size, len(devices)
    )
    steps_per_epoch = data_info.steps_per_epoch
    # Durations are converted from epochs to steps here and nowhere else.
    if config.train.steps:
        total_steps = int(config.train.steps)
    else:
        total_steps = int(math.ceil(config.train.epochs * steps_per_epoch))
    warmup_steps = int(round(config.optim.warmup_epochs * steps_per_epoch))
    config_checks.check_schedule(warmup_steps, total_steps, config.optim.warmup_epochs)

    bn_axis = sharding.DATA_AXIS if config.model.global_bn else None
    model = methods.build_model(
        config, num_classes=data_info.num_classes, bn_axis_name=bn_axis, conv=conv
    )
    tx, schedule = optim.create_optimizer(
        config.optim,
        batch_size=config.train.batch_size,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
    )
    return Run(
        model=model,
        method=methods.from_config(
            config, total_steps=total_steps, num_examples=data_info.num_examples
        ),
        tx=tx,
        schedule=schedule,
        mesh=mesh,
        devices=devices,
        parallelism=config.train.parallelism,
        micro_batch_per_device=micro_per_device,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        steps_per_epoch=steps_per_epoch,
        info=data_info,
        conv=conv,
        monitor_every_steps=(
            max(1, int(round(monitor_epochs * steps_per_epoch))) if monitor_epochs else 0
        ),
    )


def _init_fn(config, run: Run):
    """key -> the step-0 TrainState of this run (the 'random init')."""
    image_shape = (config.augment.image_size, config.augment.image_size, 3)
    return lambda key: run.method.create_state(run.model, run.tx, key, image_shape)


def _init_state(config, run: Run, manager) -> tuple[steps.TrainState, int]:
    """Fresh state or the latest checkpoint, placed as the parallel mode needs."""
    rng = jax.random.key(config.seed)
    init_fn = _init_fn(config, run)
    replicated = sharding.replicated_sharding(run.mesh)
    abstract = jax.eval_shape(init_fn, rng)
    latest = manager.latest_step()
    if latest is not None:
        target = jax.tree_util.tree_map(lambda _: replicated, abstract)
        state = checkpoint.restore(manager, checkpoint.abstract_like(abstract, target), latest)
        print(f"resumed from step {latest} of {manager.directory}", flush=True)
    else:
        # Created directly in its final (replicated) sharding: no host copy.
        state = jax.jit(init_fn, out_shardings=replicated)(rng)
    start_step = int(jax.device_get(state.step))
    if config.train.parallelism == "pmap":
        state = sharding.replicate_for_pmap(state, run.devices)
    return state, start_step


def _compute_scalars(metrics: steps.TrainMetrics) -> tuple[dict[str, float], int, int]:
    """(scalars to log, first step with a non-finite loss, first with a non-finite state)."""
    values = jax.device_get(metrics.compute())
    first_bad_loss = int(values.pop("first_nonfinite_step"))
    first_bad_state = int(values.pop("first_nonfinite_state_step"))
    scalars = {f"train/{k}": float(v) for k, v in values.items()}
    return scalars, first_bad_loss, first_bad_state


def _write_json(path: str, payload: dict) -> None:
    """Process 0 writes payload to path (local or gs://) atomically."""
    if jax.process_index() == 0:
        files.write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def _done_message(results: dict, throughput: float, workdir: str) -> str:
    """The run's last line: steps, speed, kNN/probe top-1 when evaluated, where results are."""
    parts = [f"done: {results['step']} steps, {throughput:.1f} img/s"]
    summary = ", ".join(f"{k} {results[k]:.4f}" for k in ("knn_top1", "probe_top1") if k in results)
    if summary:  # empty with eval.knn=False: no empty '; ;' segment
        parts.append(summary)
    return "; ".join([*parts, f"results in {workdir}"])


@dataclasses.dataclass(frozen=True)
class _LoopEnd:
    """What the loop leaves for the finish."""

    state: steps.TrainState
    step: int
    compile_seconds: float | None
    images_per_sec: float
    # jit's executable cache: 1 means the step compiled exactly once (None for jax.pmap and
    # for the ahead-of-time compiled step of a multi-process run).
    train_step_compilations: int | None
    preempted: bool


def train_and_evaluate(config: mlc.ConfigDict, workdir: str, *, conv=nn.Conv) -> dict:
    """Pretrains with config.method (SimCLR by default), then evaluates kNN and the probe.

    Args:
      config: a pretraining config (configs/*.py).
      workdir: checkpoints, TensorBoard events, metrics.jsonl, results.json and
        config.json go here; an existing checkpoint is resumed from.
      conv: the encoder's convolution class (flax.linen.Conv or a drop-in subclass; main.py
        passes simclr_jax.cpu.conv_class's choice). Not part of the config: any run's
        checkpoint loads with any conv class.

    Returns:
      The results dict also written to workdir/results.json.

    Raises:
      config_checks.ConfigError: for a config the run cannot use, before compiling.
      steps.NonFiniteLossError: when the loss, or the state an update produces, becomes NaN or
        infinite (nothing from that step on is saved).
    """
    run, state, start_step, manager, batches = _setup(config, workdir, conv)
    step_fn = _compile_train_step(config, run)
    logger = MetricLogger(workdir, run.total_steps)
    _print_plan(config, run)
    # Built at its first use (the kNN monitor or the end), then shared: one compilation.
    evaluator = functools.cache(
        lambda: monitor.make_evaluator(
            config, mesh=run.mesh, num_classes=run.info.num_classes, conv=run.conv
        )
    )
    try:
        end = _train_loop(
            config, run, state, start_step, step_fn, batches, manager, logger, evaluator
        )
    finally:
        manager.wait_until_finished()
        logger.flush()
    return _finish(config, workdir, run, end, logger, evaluator)


def _setup(config: mlc.ConfigDict, workdir: str, conv):
    """Checks the config, writes config.json, builds the run, its state and its batches.

    Returns:
      (run, state placed for the step, its step, the checkpoint manager, host batches).
    """
    config_checks.validate_pretrain_config(config)
    methods.check_config(config)
    pipeline.configure_tensorflow()
    # Every split the run will read is opened now, the eval split of the evaluation at the end
    # included: a mistyped split fails before the first step, not after training.
    if config.eval.knn or config.eval.get("every_epochs", 0.0):
        train_split, _ = sources.open_splits(config.data)
    else:
        train_split = sources.open_split(config.data, "train_split")
    config_checks.check_batch_fits(config.train.batch_size, train_split, "train.batch_size")
    files.makedirs(workdir)
    _write_json(files.join(workdir, files.CONFIG_FILE), json.loads(config.to_json_best_effort()))

    devices = _select_devices(config)
    manager = checkpoint.create_manager(
        workdir, max_to_keep=config.checkpoint.keep, asynchronous=config.checkpoint.asynchronous
    )
    try:
        start_step_hint = manager.latest_step() or 0
        mesh = sharding.create_mesh(devices)
        # The rows of each global batch this host feeds (its block of the batch on
        # CPU/GPU; other rows where a TPU mesh interleaves hosts' devices), so the
        # data order is the same for any number of hosts.
        batch_rows = distributed.process_batch_rows(mesh, config.train.batch_size)
        train_ds, info = pipeline.build_pretrain_dataset(
            config.data,
            config.augment,
            global_batch_size=config.train.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            start_step=start_step_hint,
            batch_rows=batch_rows,
        )
        run = _build_run(config, info, devices, mesh, conv)
        state, start_step = _init_state(config, run, manager)
    except BaseException:
        manager.close()  # an open manager's threads would print a traceback at exit
        raise
    assert start_step == start_step_hint, (start_step, start_step_hint)
    return run, state, start_step, manager, iter(pipeline.as_numpy_iterator(train_ds))


def _compile_train_step(config: mlc.ConfigDict, run: Run):
    """The jitted (shard_map) or pmapped train step of this run."""
    return steps.compile_train_step(
        lambda s, b: steps.train_step(
            s,
            b,
            model=run.model,
            tx=run.tx,
            learning_rate_fn=run.schedule,
            method=run.method,
            axis_name=sharding.DATA_AXIS,
            sync_batch_stats=not config.model.global_bn,
            micro_batch_per_device=run.micro_batch_per_device,
            freeze_bn=config.train.get("micro_batch_bn", "micro") == "frozen",
        ),
        parallelism=run.parallelism,
        mesh=run.mesh,
    )


def _print_plan(config: mlc.ConfigDict, run: Run) -> None:
    print(
        f"{methods.get_method(config).TITLE} pretraining: {run.total_steps} "
        f"steps ({run.steps_per_epoch} steps/epoch, "
        f"warmup {run.warmup_steps}), global batch {config.train.batch_size} on "
        f"{len(run.devices)} devices x {jax.process_count()} processes ({run.parallelism}), "
        f"{run.info.num_examples} training examples, ResNet-{config.model.depth}",
        flush=True,
    )
    if run.micro_batch_per_device:
        print(
            f"micro-batching: {config.train.batch_size // config.train.micro_batch_size} "
            f"micro-batches of {config.train.micro_batch_size} per step (exact full-batch "
            f"NT-Xent gradient; BN mode {config.train.micro_batch_bn!r})",
            flush=True,
        )


def _train_loop(
    config: mlc.ConfigDict,
    run: Run,
    state: steps.TrainState,
    step: int,
    step_fn,
    batches: Iterator[dict],
    manager,
    logger: MetricLogger,
    evaluator: Callable[[], monitor.Evaluator],
) -> _LoopEnd:
    """Steps from `step` to run.total_steps, or to a preemption; after each step, the periodic
    work: host sync and logging, checkpoint, kNN monitor, stop."""
    throughput = hooks.Throughput(config.train.batch_size)
    stop_at = config.train.stop_at_step
    acc, compile_seconds, preempted = None, None, False
    with hooks.Preemption() as preemption:
        while step < run.total_steps:
            batch = run.to_device(next(batches))
            if compile_seconds is None:
                step_fn, state, metrics, compile_seconds = _first_step(step_fn, state, batch)
                throughput.restart()
            else:
                state, metrics = step_fn(state, batch)
                throughput.tick()
            if run.parallelism == "pmap":
                metrics = sharding.unreplicate_from_pmap(metrics)
            acc = steps.merge_metrics(acc, metrics)
            step += 1
            is_last = step == run.total_steps
            if step == stop_at and not is_last:
                preemption.request()
            log_now = hooks.every(step, config.train.log_every_steps) or is_last
            save_now = hooks.every(step, config.checkpoint.every_steps) or is_last
            stop_now = preemption.stop_now(at_sync=log_now or save_now or step == stop_at)
            monitor_now = _monitor_due(config, run, step, is_last=is_last, stopping=stop_now)
            # The sync checks the state is finite: before every save, and before the monitor
            # evaluates it.
            if log_now or save_now or stop_now or monitor_now:
                _sync_metrics(run, step, acc, throughput, logger if log_now else None)
                acc = None
                if save_now or stop_now:
                    checkpoint.save(manager, step, run.to_host_state(state))
                throughput.restart()  # the speed excludes checkpointing
            if monitor_now:
                # Every host reaches this step: the feature extraction's collectives match.
                monitor.run_monitor(evaluator(), run.to_host_state(state), step, logger)
                throughput.restart()  # and evaluations
            if stop_now and not is_last:
                preempted = True
                break
    return _LoopEnd(
        state=state,
        step=step,
        compile_seconds=compile_seconds,
        images_per_sec=throughput.images_per_sec,
        train_step_compilations=(
            step_fn._cache_size() if hasattr(step_fn, "_cache_size") else None
        ),
        preempted=preempted,
    )


def _first_step(step_fn, state, batch):
    """Compiles and runs the first step (every process waits for the slowest to compile).

    Returns:
      (the step function for the later steps, state, metrics, seconds it took).
    """
    t0 = time.time()
    if jax.process_count() > 1:
        step_fn = distributed.compile_then_barrier(step_fn, "train_step", state, batch)
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(state)
    seconds = time.time() - t0
    print(f"compiled and ran the first step in {seconds:.1f}s", flush=True)
    return step_fn, state, metrics, seconds


def _sync_metrics(run: Run, step: int, acc, throughput: hooks.Throughput, logger) -> None:
    """The loop's only host sync: metrics since the last one; stops on a non-finite loss or
    state; logs them (TensorBoard, metrics.jsonl, the progress line) when `logger` is given."""
    scalars, first_bad_loss, first_bad_state = _compute_scalars(acc)
    steps.check_finite(first_bad_loss, first_bad_state)
    scalars.update(throughput.lap())
    scalars["train/epoch"] = step / run.steps_per_epoch
    if logger is not None:
        logger.write_scalars(step, scalars)
        logger.print_progress(step, scalars)


def _monitor_due(config: mlc.ConfigDict, run: Run, step: int, *, is_last: bool, stopping: bool):
    """Whether the kNN monitor (eval.every_epochs) runs after `step`."""
    return (
        hooks.every(step, run.monitor_every_steps)
        and not (is_last and config.eval.knn)  # the evaluation at the end covers it
        and not stopping  # preempted: save and leave within the grace period
    )


def _finish(config, workdir: str, run: Run, end: _LoopEnd, logger, evaluator) -> dict:
    """Results of the run; unless preempted, the kNN/probe evaluation and results.json."""
    results = {
        "step": end.step,
        "total_steps": run.total_steps,
        "compile_seconds": end.compile_seconds,
        "images_per_sec": end.images_per_sec,
        "train_step_compilations": end.train_step_compilations,
        "num_devices": len(run.devices),
        "batch_size": config.train.batch_size,
        "micro_batch_size": config.train.get("micro_batch_size", 0),
        "num_processes": jax.process_count(),
        "dataset": f"{config.data.source}:{config.data.name}",
    }
    if end.preempted:
        print(
            f"stopped early: checkpoint saved at step {end.step}; rerun the same command to resume."
        )
        results["preempted"] = True
        logger.close()
        return results
    if config.eval.knn:
        init = jax.jit(_init_fn(config, run))
        results.update(
            monitor.evaluate_pretrained(
                config,
                run.to_host_state(end.state),
                evaluator(),
                initial_state=lambda: init(jax.random.key(config.seed)),
            )
        )
        logger.write_scalars(
            end.step,
            {
                f"eval/{k}": v
                for k, v in results.items()
                if k.startswith(("knn_", "probe_", "random_init_"))
            },
        )
    logger.close()
    _write_json(files.join(workdir, files.RESULTS_FILE), results)
    print(_done_message(results, end.images_per_sec, workdir))
    return results
