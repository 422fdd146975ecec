"""The argument handling and the recipe of benchmarks/quality_vs_lightly.py: no training, no
torch needed (the lightly side's modules import torch only when a builder runs)."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
SCRIPT = os.path.join(BENCHMARKS, "quality_vs_lightly.py")
# The script's sibling modules, imported by name as when it runs as a script.
SIBLINGS = ("quality_recipe", "lightly_side", "lightly_methods")


@pytest.fixture(scope="module")
def harness():
    """The driver loaded from its file, its siblings importable; both undone afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(BENCHMARKS)
        spec = importlib.util.spec_from_file_location("bench_quality_vs_lightly", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
        for name in SIBLINGS:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def recipe_module(harness):
    return sys.modules["quality_recipe"]


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


@pytest.mark.parametrize(
    "method, why",
    [("mocov3", "lightly has MoCo v3's heads but not its loss"), ("simsiam", "unknown method")],
)
def test_a_method_without_counterpart_names_why_and_the_available_ones(
    harness, capsys, method, why
):
    line = _error_line(harness, capsys, [f"--method={method}"])
    assert f"--method={method!r} has no lightly counterpart ({why}" in line
    assert "available: simclr, byol, mocov2, barlow_twins, vicreg, nnclr" in line


def test_every_method_has_our_config_and_a_lightly_builder(harness):
    """Each METHODS entry names a config file of ours and a builder in lightly_methods.py
    (imported without torch: the builders import it when called)."""
    import lightly_methods

    from simclr_jax.methods import METHODS as OUR_METHODS

    for name, method in harness.METHODS.items():
        assert os.path.isfile(os.path.join(ROOT, method.our_config)), name
        assert callable(getattr(lightly_methods, method.lightly_counterpart)), name
        assert name in OUR_METHODS
    assert not set(harness.NO_COUNTERPART) & set(harness.METHODS)
    assert set(harness.METHODS) | set(harness.NO_COUNTERPART) == set(OUR_METHODS)


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--sides=ours,torch", "--sides="),
        ("--width=0", "--width=0 must be a positive integer"),
        ("--epochs=0.25", "must be at least the warmup, 0.5"),
        ("--epochs=nan", "must be at least the warmup"),
        ("--role=lightly", "--role=lightly needs --data_root, --recipe and --out"),
        ("--role=recipe", "--role=recipe needs --out"),
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
    assert "needs json, no_such_module_xyz" in message
    assert "pip install" in message and "\n" not in message
    harness.check_lightly_python(sys.executable, modules=("json",))  # present: no error


def test_missing_data_is_named(harness, capsys, tmp_path):
    argv = ["--sides=ours", f"--data={tmp_path / 'none.tar.gz'}", f"--workdir={tmp_path}"]
    line = _error_line(harness, capsys, argv)
    assert "none.tar.gz" in line and "no such archive or folder" in line


def test_the_driver_imports_no_torch():
    code = (
        f"import runpy, sys; sys.path.insert(0, {BENCHMARKS!r}); runpy.run_path({SCRIPT!r}); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_resumed_comparison_names_the_fields_that_changed(harness, tmp_path):
    args = harness.parse_args(["--width=8", f"--workdir={tmp_path}"])
    path = tmp_path / "setting.json"
    path.write_text(json.dumps(harness._setting(args, "a" * 64)))
    harness._check_setting(str(path), harness._setting(args, "a" * 64))  # same: no error
    changed = harness.parse_args(["--width=16", f"--workdir={tmp_path}"])
    with pytest.raises(harness.HarnessError, match=r"recipe_sha256, width differ"):
        harness._check_setting(str(path), harness._setting(changed, "b" * 64))
    older = harness._setting(args, "a" * 64)
    del older["recipe_sha256"]  # a workdir of the harness before the hash
    path.write_text(json.dumps(older))
    with pytest.raises(harness.HarnessError, match=r"predates the recipe's hash.*delete it"):
        harness._check_setting(str(path), harness._setting(args, "a" * 64))


def _view(**changes):
    view = {
        "crop_area_range": [0.2, 1.0],
        "crop_aspect_range": [3 / 4, 4 / 3],
        "jitter_magnitudes": [0.4, 0.3, 0.2, 0.1],
        "jitter_prob": 0.8,
        "grayscale_prob": 0.2,
        "blur_prob": 0.5,
        "blur_sigma_range": [0.1, 2.0],
        "flip_prob": 0.5,
    }
    return view | changes


def _lightly_recipe(optim=(), train=(), view=()):
    optim = {"name": "lars", "lr_scaling": "linear", "base_lr": 1.0} | dict(optim)
    return {"optim": optim, "train": {"steps": 0} | dict(train), "views": [_view(**dict(view))] * 2}


@pytest.mark.parametrize(
    "recipe, expected",
    [
        (_lightly_recipe(optim={"name": "adamw"}), "optim.name='adamw': the lightly side has"),
        (_lightly_recipe(optim={"probe_weight_decay": True}), "optim.probe_weight_decay=True"),
        (_lightly_recipe(train={"steps": 100}), "train.steps=100: the harness's budget"),
        (_lightly_recipe(view={"crop_area_range": [0.2, 0.9]}), r"view 1: crop area \(0.2, 0.9\)"),
        (_lightly_recipe(view={"crop_aspect_range": [0.5, 2.0]}), r"aspect \(0.5, 2.0\)"),
    ],
)
def test_a_recipe_lightly_cannot_reproduce_is_refused(recipe_module, recipe, expected):
    with pytest.raises(recipe_module.HarnessError, match=expected):
        recipe_module.check_lightly_recipe(recipe)


def test_a_recipe_lightly_can_reproduce_passes(recipe_module):
    recipe_module.check_lightly_recipe(_lightly_recipe())
    recipe_module.check_lightly_recipe(
        _lightly_recipe(optim={"name": "sgd", "probe_weight_decay": True})
    )


def test_the_driver_checks_the_recipe_for_lightly_before_any_run(harness, tmp_path, monkeypatch):
    """A recipe the lightly side refuses stops the driver before our side's first seed, and
    a refused setting leaves the workdir's recipe and setting as they were."""
    data = tmp_path / "images"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            (data / cls / f"{i}.jpg").write_bytes(b"not decoded here")
    workdir = tmp_path / "w"
    ran = []
    monkeypatch.setattr(harness, "check_lightly_python", lambda python: None)
    monkeypatch.setattr(harness, "run_ours", lambda *a: ran.append("ours"))
    monkeypatch.setattr(harness, "run_lightly", lambda *a: ran.append("lightly"))

    def resolve(args, out):
        with open(out, "w") as f:
            json.dump(_lightly_recipe(optim={"probe_weight_decay": True}), f)
        return "c" * 64

    monkeypatch.setattr(harness, "resolve_recipe", resolve)
    argv = [f"--data={data}", f"--workdir={workdir}", "--train_per_class=2", "--eval_per_class=1"]
    with pytest.raises(harness.HarnessError, match="probe_weight_decay"):
        harness.drive(harness.parse_args(argv))
    assert ran == [] and sorted(os.listdir(workdir)) == ["data"]  # no recipe, no setting


@pytest.mark.slow
def test_the_driver_resolves_the_recipe_as_main_py_checks_it(harness, tmp_path):
    """resolve_recipe runs --role=recipe under --ours_python (a subprocess importing jax); a
    setting main.py would reject (MoCo v2's queue of 32768 keys is no multiple of a batch of
    100) fails there, in one line, before any training; an accepted one gives the file and
    its hash."""
    out = str(tmp_path / "recipe.json")
    args = harness.parse_args(["--method=mocov2", "--batch=100", f"--workdir={tmp_path}"])
    with pytest.raises(harness.HarnessError) as error:
        harness.resolve_recipe(args, out)
    message = str(error.value)
    assert message.startswith("resolving our mocov2 recipe failed: our mocov2 config")
    assert "queue_size=32768" in message and "multiple" in message
    args = harness.parse_args(["--method=mocov2", "--batch=128", f"--workdir={tmp_path}"])
    digest = harness.resolve_recipe(args, out)
    with open(out, "rb") as f:
        content = f.read()
    assert hashlib.sha256(content).hexdigest() == digest
    recipe = json.loads(content)
    assert recipe["method"]["queue_size"] == 32768 and recipe["train"]["batch_size"] == 128


def _recipe(harness, tmp_path, method, *extra):
    out = tmp_path / f"{method}.json"
    harness.main(["--role=recipe", f"--method={method}", f"--out={out}", *extra])
    with open(out) as f:
        return json.load(f)


def test_the_recipe_is_our_config_with_the_settings_overrides(harness, recipe_module, tmp_path):
    """What the lightly side configures itself from: our config file resolved with the
    harness's overrides, each view's augmentations resolved by our own view_recipe."""
    from configs import byol_cifar10
    from simclr_jax import optim

    recipe = _recipe(harness, tmp_path, "byol", "--width=8", "--batch=64", "--epochs=2")
    config = byol_cifar10.get_config()
    assert recipe["method"] == config.method.to_dict()
    assert recipe["model"]["base_width"] == 8 and recipe["model"]["cifar_stem"] is True
    assert recipe["train"]["batch_size"] == 64 and recipe["train"]["epochs"] == 2.0
    assert recipe["optim"]["warmup_epochs"] == recipe_module.WARMUP_EPOCHS
    assert recipe["optim"]["weight_decay"] == config.optim.weight_decay == 1e-5
    # The lightly side's peak LR is ours, not a copy of the formula: base_lr x 64 / 256.
    assert recipe["peak_lr"] == optim.peak_learning_rate(config.optim.base_lr, 64, "linear")
    assert recipe["peak_lr"] == pytest.approx(config.optim.base_lr * 64 / 256)
    view1, view2 = recipe["views"]
    assert (view1["solarize_prob"], view2["solarize_prob"]) == (0.0, 0.2)  # BYOL's asymmetry
    assert view1["jitter_magnitudes"] == [0.4, 0.4, 0.2, 0.1]
    assert view1["brightness_mode"] == "additive"

    simclr = _recipe(harness, tmp_path, "simclr")
    assert simclr["method"]["name"] == "simclr"
    assert (simclr["loss"]["temperature"], simclr["loss"]["loss_scale"]) == (0.5, 2.0)
    assert simclr["optim"]["name"] == "lars" and simclr["optim"]["base_lr"] == recipe_module.BASE_LR
    assert simclr["peak_lr"] == recipe_module.BASE_LR  # x 256 / 256
    assert simclr["model"]["head_layers"] == 3 and simclr["model"]["head_dim"] == 128
    assert simclr["views"][0] == simclr["views"][1]
    assert simclr["views"][0]["jitter_magnitudes"] == [0.4, 0.4, 0.4, 0.1]  # strength 0.5
    assert simclr["views"][0]["blur_prob"] == 0.0


def test_view_options_map_our_view_to_lightlys_arguments(harness):
    import lightly_side

    options = lightly_side.view_options(_view(), 32)
    assert options["min_scale"] == 0.2 and options["input_size"] == 32
    assert (options["cj_bright"], options["cj_contrast"], options["cj_sat"]) == (0.4, 0.3, 0.2)
    assert options["cj_hue"] == 0.1 and options["cj_strength"] == 1.0
    assert options["cj_prob"] == 0.8 and options["random_gray_scale"] == 0.2
    assert options["gaussian_blur"] == 0.5 and options["sigmas"] == (0.1, 2.0)
    assert options["hf_prob"] == 0.5 and options["normalize"] is None
