"""The argument handling of benchmarks/quality_vs_lightly.py: no training, no torch needed."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "quality_vs_lightly.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_quality_vs_lightly", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness():
    return _load()


def _error_line(harness, capsys, argv):
    """Runs main(argv), expects exit status 2, returns the last stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        harness.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def test_seeds_parse_in_order(harness):
    assert harness.parse_seeds("2,0,1") == [2, 0, 1]
    assert harness.parse_args(["--seeds=5"]).seed_list == [5]


@pytest.mark.parametrize("seeds", ["0,x", "-1", "0,0", "", "1.5"])
def test_bad_seeds_fail_with_the_flag_named(harness, capsys, seeds):
    line = _error_line(harness, capsys, [f"--seeds={seeds}"])
    assert f"--seeds={seeds!r}" in line


def test_unknown_method_names_the_available_ones(harness, capsys):
    line = _error_line(harness, capsys, ["--method=byol"])
    assert "--method='byol' has no lightly counterpart yet" in line
    assert "available: simclr" in line


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--sides=ours,torch", "--sides="),
        ("--width=0", "--width=0 must be a positive integer"),
        ("--epochs=0.25", "must be at least the warmup, 0.5"),
        ("--epochs=nan", "must be at least the warmup"),
        ("--role=lightly", "--role=lightly needs --data_root and --out"),
    ],
)
def test_bad_setting_fails_with_the_flag_named(harness, capsys, flag, expected):
    assert expected in _error_line(harness, capsys, [flag])


def test_missing_interpreter_fails_in_one_line_with_the_install_command(harness, capsys, tmp_path):
    missing = str(tmp_path / "no_venv" / "bin" / "python")
    argv = ["--sides=lightly", f"--lightly_python={missing}", f"--workdir={tmp_path / 'w'}"]
    line = _error_line(harness, capsys, argv)
    assert line.startswith("error: --lightly_python=") and "no such interpreter" in line
    assert "pip install torch==2.14.1 torchvision==0.29.1 lightly" in line
    assert not (tmp_path / "w").exists()  # checked before anything is written


def test_missing_packages_are_named_with_the_install_command(harness):
    with pytest.raises(harness.HarnessError) as error:
        harness.check_lightly_python(sys.executable, modules=("json", "no_such_module_xyz"))
    message = str(error.value)
    assert "needs json, no_such_module_xyz" in message and "no_such_module_xyz" in message
    assert "pip install" in message and "\n" not in message
    harness.check_lightly_python(sys.executable, modules=("json",))  # present: no error


def test_missing_data_is_named(harness, capsys, tmp_path):
    argv = ["--sides=ours", f"--data={tmp_path / 'none.tar.gz'}", f"--workdir={tmp_path}"]
    line = _error_line(harness, capsys, argv)
    assert "none.tar.gz" in line and "no such archive or folder" in line


def test_the_driver_imports_no_torch():
    code = f"import runpy, sys; runpy.run_path({SCRIPT!r}); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
