"""simclr_jax/cli.py: user errors as one line with exit status 2, other errors as tracebacks,
TensorFlow's start-up log lines dropped; and the errors the library marks as user errors."""

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from simclr_jax import cli, config_checks
from simclr_jax.config_checks import ConfigError, MissingPathError, UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python(code: str, **env_overrides) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_overrides)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_user_errors_keep_the_builtin_types_callers_catch():
    config_error = ConfigError("config.loss.temperature=0.0 is invalid: ...")
    missing = MissingPathError("config.init_from='x' does not exist (/x)")
    assert isinstance(config_error, UserInputError) and isinstance(config_error, ValueError)
    assert isinstance(missing, UserInputError) and isinstance(missing, FileNotFoundError)
    assert isinstance(missing, OSError) and missing.errno is None
    assert str(missing) == "config.init_from='x' does not exist (/x)"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        raise missing
    for error in (config_error, missing):  # e.g. across processes
        assert str(pickle.loads(pickle.dumps(error))) == str(error)
    with pytest.raises(ConfigError, match=r"^config.train.batch_size=7 is invalid: "):
        config_checks.fail("train.batch_size", 7, "it must be even.")


def test_a_user_error_is_one_line_on_stderr_and_exit_status_2(capsys):
    def main(argv):
        print("started")
        raise ConfigError("config.loss.temperature=0.0 is invalid:\n  the temperature must be > 0.")

    with pytest.raises(SystemExit) as exit_info:
        cli.exit_on_user_error(main)(["prog"])
    assert exit_info.value.code == cli.USER_ERROR_EXIT_STATUS == 2
    out, err = capsys.readouterr()
    assert out == "started\n"
    assert err == "error: config.loss.temperature=0.0 is invalid: the temperature must be > 0.\n"
    with pytest.raises(SystemExit) as exit_info:
        cli.exit_on_user_error(lambda argv: (_ for _ in ()).throw(MissingPathError("gone")))([])
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: gone\n"


def test_other_errors_and_results_pass_through():
    def broken(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        cli.exit_on_user_error(broken)([])
    # A plain ValueError is not marked as the user's: it keeps its traceback.
    with pytest.raises(ValueError, match="plain"):
        cli.exit_on_user_error(lambda argv: (_ for _ in ()).throw(ValueError("plain")))([])
    assert cli.exit_on_user_error(lambda argv: argv)(["a"]) == ["a"]


@pytest.mark.slow
def test_run_exits_2_for_a_user_error_and_shows_the_traceback_of_a_bug():
    program = """
        import sys
        from simclr_jax import cli
        from simclr_jax.config_checks import ConfigError

        def main(argv):
            if sys.argv[-1] == "bug":
                raise RuntimeError("boom")
            raise ConfigError("config.x=1 is invalid: use 2.")

        cli.run(main)
    """
    user = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(program), "user"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert user.returncode == 2, user.stderr
    assert user.stderr == "error: config.x=1 is invalid: use 2.\n" and user.stdout == ""
    bug = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(program), "bug"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bug.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in bug.stderr
    assert bug.stderr.rstrip().endswith("RuntimeError: boom")


def test_start_up_noise_filter_follows_tf_cpp_min_log_level():
    notice = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
    )
    info = "I0000 00:00:1796004011.319670    3404 port.cc:153] oneDNN custom operations are on."
    warning = "W0000 00:00:1796004011.319670    3404 x.cc:1] a warning"
    error = "E1130 02:05:44.614456    5775 x.cc:2] an error"
    python_warning = "/x/y.py:3: DeprecationWarning: old"
    lines = [notice, info, warning, error, python_warning]
    kept = {level: [x for x in lines if not cli._is_start_up_noise(x, level)] for level in range(4)}
    assert kept[0] == lines
    assert kept[1] == [warning, error, python_warning]
    assert kept[2] == [error, python_warning]
    assert kept[3] == [python_warning]


@pytest.mark.slow
def test_tensorflow_imports_quietly_unless_asked_for_its_logs():
    program = """
        import sys
        from simclr_jax import cli
        print("before", file=sys.stderr, flush=True)
        cli.import_tensorflow_quietly()
        print("after", file=sys.stderr, flush=True)
        import tensorflow as tf
        print(tf.constant(2).numpy() + 1)
    """
    loud = python(program, TF_CPP_MIN_LOG_LEVEL="0")
    assert loud.returncode == 0, loud.stderr
    if "oneDNN custom operations are on" not in loud.stderr:
        pytest.skip("this TensorFlow logs no oneDNN line at import")
    quiet = python(program, TF_CPP_MIN_LOG_LEVEL="3")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "3\n"
    # stderr works before and after (file descriptor 2 restored); nothing else on it.
    assert quiet.stderr == "before\nafter\n"


# --- The errors the library marks as the user's. ------------------------------------------


def test_input_errors_of_evaluation_are_user_errors(tmp_path):
    from tiny_run import tiny_config

    from configs import linear_eval as linear_config
    from simclr_jax.eval import finetune, linear, protocols, subsets
    from simclr_jax.eval import pretrained as pretrained_lib

    with pytest.raises(ConfigError, match="init_from is empty"):
        pretrained_lib.load_pretrained("")
    with pytest.raises(MissingPathError, match="does not exist"):
        pretrained_lib.load_pretrained(str(tmp_path / "nope"))
    with pytest.raises(MissingPathError, match="holds no checkpoint"):
        pretrained_lib.load_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="protocol='pretrained'"):
        protocols.run("pretrained", linear_config.get_config(), str(tmp_path))
    with pytest.raises(ConfigError, match="label_fraction=2.0"):
        subsets.check_fraction(2.0)
    with pytest.raises(ConfigError, match="linear.epochs=0"):
        cfg = linear_config.get_config().linear
        cfg.epochs = 0
        linear.train_linear_on_features(np.zeros((4, 2)), np.zeros(4, int), 2, cfg)
    with pytest.raises(ConfigError, match="ft_proj_selector=5"):
        finetune.build_finetune_model(tiny_config().model, 10, ft_proj_selector=5)
    with pytest.raises(ConfigError, match="classes but the dataset has"):
        pretrained_lib.check_num_classes(10, 100, head="probe", fix="retrain")


def test_input_errors_of_training_and_the_sweep_are_user_errors():
    from tiny_run import tiny_config

    from simclr_jax import distributed, optim
    from simclr_jax.data import views
    from simclr_jax.sweep import launch

    augment = tiny_config().augment
    augment.flip_prob = 2.0
    with pytest.raises(ConfigError, match=r"^config.augment.flip_prob=2.0: allowed range"):
        views.validate_augment_config(augment)
    optim_cfg = tiny_config().optim
    optim_cfg.momentum = 1.5
    with pytest.raises(ConfigError, match="config.optim.momentum"):
        optim.create_optimizer(optim_cfg, batch_size=16, total_steps=10, warmup_steps=0)
    with pytest.raises(ConfigError, match="is not 'host:port'"):
        distributed.resolve_settings("localhost", 2, 0, env={})
    with pytest.raises(ConfigError, match="platform='tpu7'"):
        launch.launch_commands(None, "w", "tpu7")
