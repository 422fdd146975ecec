r"""SimCLR pretraining entry point.

  python main.py --config=configs/quickstart.py --workdir=workdirs/quickstart
  python main.py --config=configs/cifar10.py --workdir=workdirs/cifar10 \
      --config.train.batch_size=256

Any config field can be overridden with --config.<section>.<field>=value; the
config is locked, so a mistyped field name fails immediately. An error the user can
fix (a bad config value, a missing path, an unknown dataset or split) prints as one
line, `error: ...`, and exits with status 2 (simclr_jax/cli.py).
"""

import os

# TensorFlow is only used for the input pipeline: keep it off accelerators and
# quiet. This must happen before TensorFlow is imported (main() imports it first,
# through cli.import_tensorflow_quietly; set TF_CPP_MIN_LOG_LEVEL=0 to see its logs).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The CPU boundary (simclr_jax/cpu), optional: without it every run uses XLA's convolutions.
# Its malloc policy (XLA:CPU's step buffer reused, not faulted in anew each step) must be set
# before any thread starts, and its XLA:CPU flags (YNNPACK off convolutions, ...) are read when
# the backend starts: both happen before jax is imported. See simclr_jax/cpu/host_memory.py
# and simclr_jax/cpu/xla_flags.py.
try:
    from simclr_jax.cpu import host_memory, xla_flags  # noqa: E402  (import no jax)
except ImportError:
    xla_flags = None
else:
    host_memory.apply()
    xla_flags.apply()
    from simclr_jax.cpu import conv_class  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from simclr_jax import cli  # noqa: E402  (imports neither jax nor TensorFlow)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs and results go; an existing run resumes."
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.path.join(os.path.expanduser("~"), ".cache", "simclr_jax", "jax"),
    "JAX persistent compilation cache directory ('' disables it).",
)
_CPU_CONV = flags.DEFINE_enum(
    "cpu_conv",
    "auto",
    conv_class.CONV_CHOICES if xla_flags is not None else ("auto", "xla"),
    "Convolution implementation (an execution choice, not stored with the run; checkpoints "
    "load with any): 'auto' = XLA's on GPU/TPU, the fastest measured on CPU (see "
    "simclr_jax/cpu/conv_class.py).",
)
flags.mark_flags_as_required(["config", "workdir"])

# --- multi-host (simclr_jax/distributed.py; env fallbacks SIMCLR_*, SLURM_*, TPU VM) ---
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    "",
    "host:port of process 0's JAX coordinator (multi-process GPU/CPU runs); '' reads "
    "SIMCLR_COORDINATOR_ADDRESS, then SLURM; TPU VMs need nothing.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Total processes of a multi-process run (0: from the environment)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "This process's rank in [0, num_processes) (-1: from the environment)."
)
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for the coordinator and every process to join."
)
# --- end multi-host ---


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    # Before anything imports TensorFlow: its start-up log lines would bypass TF_CPP_MIN_LOG_LEVEL.
    cli.import_tensorflow_quietly()
    # Multi-host: must run before anything touches devices.
    from simclr_jax import distributed

    distributed.initialize(
        _COORDINATOR_ADDRESS.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        timeout_s=_DISTRIBUTED_TIMEOUT.value,
    )
    if _COMPILATION_CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    config = _CONFIG.value
    # One entry point for every protocol: configs/<name>.py sets config.protocol
    # ('pretrain' when absent). Imported here so flags are parsed before TF/JAX
    # start work.
    protocol = config.get("protocol", "pretrain")
    # The CPU boundary hands the models their convolution class (XLA's without it).
    conv = conv_class.conv_class(_CPU_CONV.value) if xla_flags is not None else nn.Conv
    if protocol == "pretrain":
        from simclr_jax import train

        train.train_and_evaluate(config, _WORKDIR.value, conv=conv)
    else:
        from simclr_jax.eval import protocols

        protocols.run(protocol, config, _WORKDIR.value, conv=conv)


if __name__ == "__main__":
    cli.run(main)
