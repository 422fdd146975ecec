"""Test setup: 8 fake CPU devices, TF kept off GPUs, a persistent compile cache, and the
session's one tiny pretraining run (fixture `tiny_pretrained_run`).

The environment must be set before jax or tensorflow is imported anywhere, which
is why it happens at the top of conftest rather than in a fixture.
"""

import os

from simclr_jax.cpu import host_memory, xla_flags  # noqa: E402  (import no jax)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# main.py's malloc policy (XLA's step buffer reused; threads pytest already started keep their
# own arenas, so here it holds only in part) and XLA:CPU flags.
host_memory.apply()
xla_flags.add_flag("xla_force_host_platform_device_count", "8")
# The same XLA:CPU flags as main.py (tests that build models in-process use nn.Conv, the
# library default; main.py subprocess tests use simclr_jax.cpu.conv_class like users do).
xla_flags.apply()
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".jax_cache"))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pretrained_run(tmp_path_factory):
    """The workdir of one tiny pretraining run (tiny_run.tiny_config()), shared by the session.

    Read it; never write into it (copy what a test must change).
    """
    from tiny_run import tiny_config

    from simclr_jax import train

    workdir = str(tmp_path_factory.mktemp("tiny_pretrained_run"))
    train.train_and_evaluate(tiny_config(), workdir)
    return workdir
