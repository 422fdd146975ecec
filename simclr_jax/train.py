"""The SimCLR pretraining loop: data, state, step, metrics, checkpoints, kNN at the end.

Resume order matters and is why things happen in this sequence: the restored
step decides where the input pipeline starts, so the checkpoint step is read
before the pipeline is built; the data order and every augmentation are pure
functions of (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would.
"""

import dataclasses
import json
import math
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax import (
    checkpoint,
    config_checks,
    distributed,
    files,
    models,
    optim,
    sharding,
    steps,
)
from simclr_jax.data import pipeline
from simclr_jax.eval import features, knn, reports
from simclr_jax.metrics import MetricLogger


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss becomes NaN or infinite; no checkpoint is written after it."""


@dataclasses.dataclass
class _Preemption:
    """Set by SIGTERM; the loop saves and exits at the next step boundary."""

    requested: bool = False

    def __call__(self, signum, frame):
        del frame
        self.requested = True
        print(f"received signal {signum}: saving a checkpoint at the next step", flush=True)


@dataclasses.dataclass
class Run:
    """What the loop needs, built once from the config."""

    model: Any
    tx: Any
    schedule: Any
    mesh: Any
    devices: list
    micro_batch_per_device: int | None
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int
    info: Any
    # The encoder's convolution class (models.build_model's `conv`).
    conv: Any = nn.Conv
    # The kNN monitor runs every this many steps during training (0: only at the end).
    monitor_every_steps: int = 0


def _select_devices(config: mlc.ConfigDict) -> list:
    devices = sharding.select_devices(config.train.num_devices)
    config_checks.check_batch_split(
        config.train.batch_size, len(devices), jax.process_count(), "train.batch_size"
    )
    return devices


def _build_run(config: mlc.ConfigDict, data_info, devices: list, mesh, conv) -> Run:
    monitor_epochs = config.eval.get("every_epochs", 0.0)
    if config.eval.knn or monitor_epochs:
        config_checks.check_batch_split(
            config.eval.batch_size, len(devices), jax.process_count(), "eval.batch_size"
        )
    micro_per_device = config_checks.micro_batch_per_device(
        config.train.get("micro_batch_size", 0), config.train.batch_size, len(devices)
    )
    steps_per_epoch = data_info.steps_per_epoch
    if steps_per_epoch <= 0:
        raise config_checks.ConfigError(
            f"config.train.batch_size={config.train.batch_size} is larger than the training data "
            f"({data_info.num_examples} examples): lower the batch size."
        )
    # Durations are converted from epochs to steps here and nowhere else.
    if config.train.steps:
        total_steps = int(config.train.steps)
    else:
        total_steps = int(math.ceil(config.train.epochs * steps_per_epoch))
    warmup_steps = int(round(config.optim.warmup_epochs * steps_per_epoch))
    config_checks.check_schedule(warmup_steps, total_steps, config.optim.warmup_epochs)

    bn_axis = sharding.DATA_AXIS if config.model.global_bn else None
    model = models.build_model(
        config.model, num_classes=data_info.num_classes, bn_axis_name=bn_axis, conv=conv
    )
    tx, schedule = optim.create_optimizer(
        config.optim,
        batch_size=config.train.batch_size,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
    )
    return Run(
        model=model,
        tx=tx,
        schedule=schedule,
        mesh=mesh,
        devices=devices,
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
    return lambda key: steps.create_train_state(run.model, run.tx, key, image_shape)


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


def _to_host_state(state, parallelism: str):
    return sharding.unreplicate_from_pmap(state) if parallelism == "pmap" else state


def _compute_scalars(metrics: steps.TrainMetrics) -> tuple[dict[str, float], int]:
    values = jax.device_get(metrics.compute())
    first_bad = int(values.pop("first_nonfinite_step"))
    scalars = {f"train/{k}": float(v) for k, v in values.items()}
    return scalars, first_bad


def _check_finite(first_bad: int) -> None:
    if first_bad != steps.NO_NONFINITE_STEP:
        raise NonFiniteLossError(
            f"the loss became non-finite at step {first_bad}; stopping without saving. "
            "The last checkpoint in the workdir is from before it. Lower the learning rate "
            "(config.optim.base_lr), raise config.loss.temperature, or use float32."
        )


def _any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective: all must call it)."""
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.asarray(flags).any())


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


def train_and_evaluate(config: mlc.ConfigDict, workdir: str, *, conv=nn.Conv) -> dict:
    """Pretrains SimCLR as configured, then evaluates kNN and the online probe.

    Args:
      config: a pretraining config (configs/*.py).
      workdir: checkpoints, TensorBoard events, metrics.jsonl, results.json and
        config.json go here; an existing checkpoint is resumed from.
      conv: the encoder's convolution class (flax.linen.Conv or a drop-in subclass; main.py
        passes simclr_jax.cpu.conv_class's choice). Not part of the config: any run's
        checkpoint loads with any conv class.

    Returns:
      The results dict also written to workdir/results.json.
    """
    config_checks.validate_pretrain_config(config)
    pipeline.configure_tensorflow()
    files.makedirs(workdir)
    _write_json(files.join(workdir, files.CONFIG_FILE), json.loads(config.to_json_best_effort()))

    manager = checkpoint.create_manager(
        workdir, max_to_keep=config.checkpoint.keep, asynchronous=config.checkpoint.asynchronous
    )
    start_step_hint = manager.latest_step() or 0
    devices = _select_devices(config)
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
    assert start_step == start_step_hint, (start_step, start_step_hint)

    parallelism = config.train.parallelism
    step_fn = steps.compile_train_step(
        lambda s, b: steps.train_step(
            s,
            b,
            model=run.model,
            tx=run.tx,
            learning_rate_fn=run.schedule,
            temperature=config.loss.temperature,
            loss_scale=config.loss.loss_scale,
            axis_name=sharding.DATA_AXIS,
            sync_batch_stats=not config.model.global_bn,
            micro_batch_per_device=run.micro_batch_per_device,
            freeze_bn=config.train.get("micro_batch_bn", "micro") == "frozen",
        ),
        parallelism=parallelism,
        mesh=run.mesh,
    )
    num_local = sharding.local_device_count(run.devices)

    def to_device(batch):
        if parallelism == "pmap":
            return sharding.shard_for_pmap(batch, num_local)
        return sharding.make_global_batch(batch, run.mesh)

    logger = MetricLogger(workdir, run.total_steps)
    print(
        f"SimCLR pretraining: {run.total_steps} steps ({run.steps_per_epoch} steps/epoch, "
        f"warmup {run.warmup_steps}), global batch {config.train.batch_size} on "
        f"{len(run.devices)} devices x {jax.process_count()} processes ({parallelism}), "
        f"{info.num_examples} training examples, ResNet-{config.model.depth}",
        flush=True,
    )
    if run.micro_batch_per_device:
        print(
            f"micro-batching: {config.train.batch_size // config.train.micro_batch_size} "
            f"micro-batches of {config.train.micro_batch_size} per step (exact full-batch "
            f"NT-Xent gradient; BN mode {config.train.micro_batch_bn!r})",
            flush=True,
        )
    preemption = _Preemption()
    previous_handler = signal.signal(signal.SIGTERM, preemption)
    images_per_step = config.train.batch_size
    data_iter = iter(pipeline.as_numpy_iterator(train_ds))
    acc = None
    compile_seconds = None
    interval_start, interval_steps = None, 0
    timed_seconds, timed_steps = 0.0, 0
    step = start_step
    stopped_early = False
    multihost = jax.process_count() > 1
    monitor = None  # the kNN monitor's evaluator, built at its first use
    try:
        while step < run.total_steps:
            batch = to_device(next(data_iter))
            t0 = time.time()
            if multihost and compile_seconds is None:
                step_fn = distributed.compile_then_barrier(step_fn, "train_step", state, batch)
            state, metrics = step_fn(state, batch)
            if parallelism == "pmap":
                metrics = sharding.unreplicate_from_pmap(metrics)
            acc = steps.merge_metrics(acc, metrics)
            step += 1
            if compile_seconds is None:
                jax.block_until_ready(state)
                compile_seconds = time.time() - t0
                print(f"compiled and ran the first step in {compile_seconds:.1f}s", flush=True)
                interval_start, interval_steps = time.time(), 0
            else:
                interval_steps += 1
            is_last = step == run.total_steps
            if step == config.train.stop_at_step and not is_last:
                preemption.requested = True
            log_now = step % config.train.log_every_steps == 0 or is_last
            save_now = step % config.checkpoint.every_steps == 0 or is_last
            if multihost:
                # SIGTERM reaches hosts at different steps; all must stop at the same
                # one or the collective save deadlocks. They agree at the steps every
                # host syncs at anyway (log, save, stop_at_step).
                boundary = log_now or save_now or step == config.train.stop_at_step
                stop_now = boundary and _any_process(preemption.requested)
            else:
                stop_now = preemption.requested
            if log_now or save_now or stop_now:
                scalars, first_bad = _compute_scalars(acc)  # the only host sync
                _check_finite(first_bad)
                acc = None
                if interval_steps:
                    seconds = time.time() - interval_start
                    timed_seconds += seconds
                    timed_steps += interval_steps
                    scalars["train/steps_per_sec"] = interval_steps / seconds
                    scalars["train/images_per_sec"] = interval_steps * images_per_step / seconds
                scalars["train/epoch"] = step / run.steps_per_epoch
                if log_now:
                    logger.write_scalars(step, scalars)
                    logger.print_progress(step, scalars)
                if save_now or stop_now:
                    checkpoint.save(manager, step, _to_host_state(state, parallelism))
                interval_start, interval_steps = time.time(), 0
            monitor_now = (
                run.monitor_every_steps
                and step % run.monitor_every_steps == 0
                and not (is_last and config.eval.knn)  # the evaluation at the end covers it
                and not stop_now  # preempted: save and leave within the grace period
            )
            if monitor_now:
                # Every host reaches this step: the feature extraction's collectives match.
                monitor = monitor or make_evaluator(config, run)
                _run_monitor(monitor, _to_host_state(state, parallelism), step, logger)
                interval_start, interval_steps = time.time(), 0  # throughput excludes it
            if stop_now and not is_last:
                stopped_early = True
                break
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        manager.wait_until_finished()
        logger.flush()

    throughput = timed_steps * images_per_step / timed_seconds if timed_seconds else float("nan")
    results = {
        "step": step,
        "total_steps": run.total_steps,
        "compile_seconds": compile_seconds,
        "images_per_sec": throughput,
        # jit's executable cache: 1 means the step compiled exactly once (not
        # available for jax.pmap).
        "train_step_compilations": (
            step_fn._cache_size() if hasattr(step_fn, "_cache_size") else None
        ),
        "num_devices": len(run.devices),
        "batch_size": config.train.batch_size,
        "micro_batch_size": config.train.get("micro_batch_size", 0),
        "num_processes": jax.process_count(),
        "dataset": f"{config.data.source}:{config.data.name}",
    }
    if stopped_early:
        print(f"stopped early: checkpoint saved at step {step}; rerun the same command to resume.")
        results["preempted"] = True
        logger.close()
        return results

    host_state = _to_host_state(state, parallelism)
    if config.eval.knn:
        results.update(evaluate_pretrained(config, run, host_state, monitor))
        logger.write_scalars(
            step,
            {
                f"eval/{k}": v
                for k, v in results.items()
                if k.startswith(("knn_", "probe_", "random_init_"))
            },
        )
    logger.close()
    _write_json(files.join(workdir, files.RESULTS_FILE), results)
    print(_done_message(results, throughput, workdir))
    return results


def _run_monitor(evaluator, state, step: int, logger: MetricLogger) -> None:
    """The kNN monitor during training: kNN and probe on the eval split, logged at `step`."""
    t0 = time.time()
    results = evaluator(state.params, state.batch_stats)
    keys = ("knn_top1", "knn_top5", "probe_top1", "probe_top5")
    scalars = {f"eval/{k}": results[k] for k in keys}
    logger.write_scalars(step, scalars)
    print(
        f"[step {step}] kNN monitor ({time.time() - t0:.1f}s): "
        + ", ".join(f"{k[5:]} {v:.4f}" for k, v in scalars.items()),
        flush=True,
    )


def make_evaluator(config: mlc.ConfigDict, run: Run):
    """The run's evaluator: (params, batch_stats, prefix='') -> kNN and probe accuracies.

    kNN (config.eval.knn_k, knn_temperature) with the train split's features as
    the memory and the eval split's as queries, and the online probe's top-1/5
    on the eval split; features of the encoder in inference mode (BN running
    statistics), extracted over every host's devices. Built once; the monitor
    during training and the evaluation at its end share it (one compilation).

    Returns:
      evaluate(params, batch_stats, prefix='') -> {'<prefix>knn_top1',
      '<prefix>knn_top5'} and, without a prefix, also 'probe_top1', 'probe_top5',
      'eval_examples', 'knn_memory_examples'. Accuracies are fractions of the
      eval split's examples, each scored once.
    """
    # Inference only: BN uses running statistics, no axis name is needed.
    model = models.build_model(
        config.model, num_classes=run.info.num_classes, bn_axis_name=None, conv=run.conv
    )
    replicated = sharding.replicated_sharding(run.mesh)

    # Variables are an argument, not a closure: closed-over arrays would be
    # baked into the executable as constants.
    @jax.jit
    def apply(variables, images):
        out = model.apply(variables, images, train=False)
        return {"h": out["h"], "probe_logits": out["probe_logits"]}

    def split_features(variables, split):
        return features.extract_features(
            lambda images: apply(variables, images), features.eval_batches(config, split), run.mesh
        )

    def knn_and_probe(params, batch_stats, prefix=""):
        variables = jax.device_put({"params": params, "batch_stats": batch_stats}, replicated)
        train_out, train_labels = split_features(variables, config.data.train_split)
        eval_out, eval_labels = split_features(variables, config.data.eval_split)
        scores = knn.knn_scores(
            train_out["h"],
            train_labels,
            eval_out["h"],
            num_classes=run.info.num_classes,
            k=config.eval.knn_k,
            temperature=config.eval.knn_temperature,
        )
        out = {
            f"{prefix}knn_top1": reports.topk_accuracy(scores, eval_labels, 1),
            f"{prefix}knn_top5": reports.topk_accuracy(scores, eval_labels, 5),
        }
        if not prefix:
            probe = eval_out["probe_logits"]
            out["probe_top1"] = reports.topk_accuracy(probe, eval_labels, 1)
            out["probe_top5"] = reports.topk_accuracy(probe, eval_labels, 5)
            out["eval_examples"] = int(len(eval_labels))
            out["knn_memory_examples"] = int(len(train_labels))
        return out

    return knn_and_probe


def evaluate_pretrained(config: mlc.ConfigDict, run: Run, state, evaluator=None) -> dict:
    """kNN (train split as memory, eval split as queries) and the probe's top-1.

    With config.eval.compare_random_init, the same kNN protocol also runs on
    the randomly initialised encoder this run started from (step 0), so the
    gain from pretraining is visible in one results file.

    Args:
      config: the run's config.
      run: the built run (model, mesh).
      state: the train state (not pmap-replicated).
      evaluator: make_evaluator(config, run), if already built.

    Returns:
      {'knn_top1', 'knn_top5', 'probe_top1', 'probe_top5', 'eval_examples',
      'knn_memory_examples'} and, with the baseline, 'random_init_knn_top1/5'.
    """
    knn_and_probe = evaluator or make_evaluator(config, run)
    t0 = time.time()
    results = knn_and_probe(state.params, state.batch_stats, "")
    if config.eval.get("compare_random_init", False):
        initial = jax.jit(_init_fn(config, run))(jax.random.key(config.seed))
        results.update(knn_and_probe(initial.params, initial.batch_stats, "random_init_"))
    print(
        f"evaluated in {time.time() - t0:.1f}s: "
        + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()})
    )
    return results
