"""Tests of simclr_jax.convert: checkpoints of the reference SimCLR TF2 code as workdirs.

The references are the two checkpoints written by the reference code and its outputs on them
(../shared/fixtures/simclr_tf2, see its README): the converted model must reproduce h, every
projection-head layer, z and the supervised logits.
"""

import json
import os
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

from configs import knn as knn_config
from configs import linear_eval as linear_config
from simclr_jax import convert, files, models, reference_checkpoint
from simclr_jax.config_checks import ConfigError, MissingPathError
from simclr_jax.eval import pretrained as pretrained_lib
from simclr_jax.eval import protocols

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Checkpoints written by the reference TF2 code, next to the repository (../shared/fixtures).
REFERENCE_FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures", "simclr_tf2")
ARCHIVES = ("r18_cifar", "r50_sk1_64px")
# Measured (float32 on CPU, this package vs the reference's outputs.npz), max |error| over
# h, every hiddens_k, z and logits, relative to that output's max |value|:
#   r18_cifar 5.8e-6 (max abs 3.8e-5, hiddens_2); r50_sk1_64px 8.4e-5 (max abs 5.9e-4, hiddens_2).
# Our own float32 vs float64 forward differs by as much (h: 4.8e-6 / 1.7e-4 abs), so this is
# float32 rounding in both implementations. Tolerance: 3e-4, 3.5x the worst measured; a wrong
# mapping, transpose, padding or BN convention changes the outputs by O(1).
RELATIVE_TOLERANCE = 3e-4


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory):
    """Both reference archives, extracted once."""
    if not os.path.isdir(REFERENCE_FIXTURES):
        pytest.skip(f"the reference checkpoint fixtures {REFERENCE_FIXTURES} are not available")
    root = tmp_path_factory.mktemp("simclr_tf2")
    for name in ARCHIVES:
        with tarfile.open(os.path.join(REFERENCE_FIXTURES, f"{name}.tar.gz")) as tar:
            tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="session")
def converted(fixtures_dir, tmp_path_factory):
    """archive name -> the workdir converted from its checkpoint (on first use)."""
    workdirs = {}

    def get(name):
        if name not in workdirs:
            out = str(tmp_path_factory.mktemp(f"converted_{name}"))
            convert.convert(str(fixtures_dir / name / "model_dir" / "ckpt-0"), out)
            workdirs[name] = out
        return workdirs[name]

    return get


@pytest.fixture(scope="session")
def r18_reference(fixtures_dir):
    return reference_checkpoint.read_reference(str(fixtures_dir / "r18_cifar" / "model_dir"))


@pytest.fixture(scope="session")
def r18_converted(r18_reference):
    """convert_variables(r18_reference): (model config, variables, report)."""
    return convert.convert_variables(r18_reference)


def _forward(pretrained, images):
    """h, [h, head layer 1, ..., z] and probe logits in inference mode."""
    model = models.build_model(pretrained.model_config, num_classes=pretrained.probe_classes)

    def variables(name):
        return {
            "params": pretrained.params[name],
            "batch_stats": pretrained.batch_stats.get(name, {}),
        }

    h = model.encoder.apply(variables("encoder"), images, train=False)
    z, hiddens = model.head.apply(variables("head"), h, train=False)
    logits = model.probe.apply({"params": pretrained.params["probe"]}, h)
    return h, hiddens, z, logits


@pytest.mark.parametrize("name", ARCHIVES)
def test_converted_model_reproduces_the_reference_outputs(name, fixtures_dir, converted):
    with open(fixtures_dir / name / "meta.json") as f:
        meta = json.load(f)
    reference = np.load(fixtures_dir / name / "outputs.npz")
    workdir = converted(name)
    pretrained = pretrained_lib.load_pretrained(workdir)  # As every protocol loads it.
    cfg = pretrained.model_config
    assert (cfg.depth, cfg.width_multiplier, cfg.sk_ratio, cfg.cifar_stem) == (
        meta["resnet_depth"],
        meta["width_multiplier"],
        meta["sk_ratio"],
        meta["cifar_stem"],
    )
    assert (cfg.head_layers, cfg.head_dim, pretrained.probe_classes) == (
        meta["num_proj_layers"],
        meta["proj_out_dim"],
        meta["num_classes"],
    )
    with open(os.path.join(workdir, files.CONFIG_FILE)) as f:
        assert json.load(f)["convert"]["imported"] == ["encoder", "head", "probe"]

    h, hiddens, z, logits = _forward(pretrained, reference["images"])
    outputs = {"h": h, "z": z, "logits": logits}
    outputs.update({f"hiddens_{k}": x for k, x in enumerate(hiddens)})
    assert len(hiddens) == meta["num_proj_layers"] + 1
    for key, value in outputs.items():
        expected = reference[key]
        error = np.max(np.abs(np.asarray(value) - expected)) / np.max(np.abs(expected))
        print(f"{name} {key}: max |error| / max |value| = {error:.2e}")
        assert error <= RELATIVE_TOLERANCE, (key, error)


# --------------------------------------------------------------- TF checkpoints built here


def _trackable_tree(variables):
    """A tf.Module tree whose object graph names `variables` ({'a/b/c': array}) as given.

    Returns (root, the tf.Variables created).
    """
    import tensorflow as tf

    root, created = tf.Module(), []
    for name, value in variables.items():
        *parents, leaf = name.split("/")
        node = root
        for parent in parents:
            if parent not in vars(node):
                setattr(node, parent, tf.Module())
            node = vars(node)[parent]
        created.append(tf.Variable(value))
        setattr(node, leaf, created[-1])
    return root, created


def _named(reference):
    """{checkpoint name: array} of a ReferenceVariables."""
    return {
        reference.full_names[(part, inner)]: value
        for part, arrays in reference.parts.items()
        for inner, value in arrays.items()
    }


def _assert_same_variables(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_savedmodel_whose_keys_are_aliases_is_read_by_structure(
    r18_reference, r18_converted, tmp_path
):
    """The released models are SavedModels whose exported module was not available here: their
    names are probably the fixtures' under another root, and Keras adds alias lists
    (`keras_api`, `variables`, ...) that can give the checkpoint keys. Both are built here."""
    import tensorflow as tf

    root = tf.Module()
    root.exported, created = _trackable_tree(_named(r18_reference))
    root.keras_api = tf.Module()
    root.keras_api.all = list(created)  # Shorter paths: the checkpoint keys become these.
    saved = tmp_path / "saved_model"
    tf.saved_model.save(root, str(saved))
    keys = [key for key, _ in tf.train.list_variables(str(saved / "variables" / "variables"))]
    assert any(key.startswith("keras_api/all/") for key in keys)
    assert not any("resnet_model" in key for key in keys)

    for path in (saved, saved / "variables" / "variables"):
        read = reference_checkpoint.read_reference(str(path))
        assert read.prefix == str(saved / "variables" / "variables")
        _assert_same_variables(convert.convert_variables(read), r18_converted)


def test_a_variable_outside_the_model_is_named(r18_reference, tmp_path):
    import tensorflow as tf

    named = _named(r18_reference)
    named["model/ema_model/kernel"] = np.zeros((2, 2), np.float32)
    root, _ = _trackable_tree(named)
    prefix = tf.train.Checkpoint(root=root).write(str(tmp_path / "ckpt"))
    with pytest.raises(ConfigError, match="unexpected variable 'model/ema_model/kernel' in the"):
        reference_checkpoint.read_reference(prefix)
    tf1, _ = _trackable_tree({"base_model/conv2d_3/kernel": np.zeros((1, 1, 2, 2), np.float32)})
    prefix = tf.train.Checkpoint(root=tf1).write(str(tmp_path / "tf1"))
    with pytest.raises(ConfigError, match="named as in the reference's TF1 code"):
        reference_checkpoint.read_reference(prefix)


def _edited(reference, part, edit):
    parts = {name: dict(arrays) for name, arrays in reference.parts.items()}
    edit(parts[part])
    full_names = dict(reference.full_names)
    for inner in parts[part]:
        full_names.setdefault((part, inner), f"model/{part}/{inner}")
    return reference_checkpoint.ReferenceVariables(
        prefix=reference.prefix, parts=parts, full_names=full_names, step=reference.step
    )


STEM_KERNEL = "initial_conv_relu_max_pool/0/conv2d/kernel"


@pytest.mark.parametrize(
    "part,edit,message",
    [
        (
            "encoder",
            lambda p: p.pop("block_groups/1/layers/0/conv2d_bn_layers/1/bn/beta"),
            "lacks the variable for params/encoder/block2_0/bn1/bias, shape (128,)",
        ),
        (
            "encoder",
            lambda p: p.update({STEM_KERNEL: np.zeros((3, 3, 64, 3), np.float32)}),
            "model/resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel has shape "
            "(3, 3, 64, 3) but the architecture read from the checkpoint's shapes needs "
            "(3, 3, 3, 64) for params/encoder/stem_conv/kernel",
        ),
        (
            "encoder",
            lambda p: p.update(
                {"block_groups/0/layers/1/conv2d_bn_layers/1/bn/renorm_mean": np.zeros(64)}
            ),
            "unexpected variables ['bn/beta', 'bn/gamma', 'bn/moving_mean', "
            "'bn/moving_variance', 'bn/renorm_mean'] in reference layer "
            "'block_groups/0/layers/1/conv2d_bn_layers/1'",
        ),
        (
            "encoder",
            lambda p: p.update(
                {
                    k.replace("block_groups/3/layers/1/", "block_groups/3/layers/2/"): v
                    for k, v in list(p.items())
                    if k.startswith("block_groups/3/layers/1/")
                }
            ),
            "the reference ResNet has [2, 2, 2, 3] basic blocks per stage",
        ),
        (
            "head",
            lambda p: p.pop("linear_layers/2/bn_relu/bn/gamma"),
            "lacks the variable for params/head/bn_2/scale, shape (128,)",
        ),
        (
            "supervised",
            lambda p: p.update({"linear_layer/dense/kernel": np.zeros((128, 10), np.float32)}),
            "needs (512, 10) for params/probe/dense/kernel: the supervised head reads another "
            "layer than h; pass the reference run's --ft_proj_selector",
        ),
    ],
    ids=["missing", "wrong_shape", "unexpected", "no_such_depth", "missing_in_head", "probe"],
)
def test_a_variable_that_does_not_fit_is_named(r18_reference, part, edit, message):
    with pytest.raises(ConfigError) as error:
        convert.convert_variables(_edited(r18_reference, part, edit))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_without_a_projection_head_the_encoder_is_kept_and_a_v1_head_initialised(
    r18_reference, r18_converted
):
    full = r18_converted
    no_head = _edited(r18_reference, "head", dict.clear)
    config, variables, report = convert.convert_variables(no_head)
    assert report == {"imported": ["encoder", "probe"], "initialised": ["head"]}
    assert (config["head_layers"], config["head_dim"]) == (2, 128)
    _assert_same_variables(variables["params"]["encoder"], full[1]["params"]["encoder"])
    _assert_same_variables(variables["params"]["probe"], full[1]["params"]["probe"])
    assert variables["params"]["head"]["dense_0"]["kernel"].shape == (512, 512)


def test_a_supervised_head_on_a_head_layer_is_dropped_with_a_warning(r18_reference, capsys):
    config, variables, report = convert.convert_variables(
        r18_reference, ft_proj_selector=1, num_classes=7
    )
    assert report == {"imported": ["encoder", "head"], "initialised": ["probe"]}
    assert "reads projection-head layer 1" in capsys.readouterr().err
    assert variables["params"]["probe"]["dense"]["kernel"].shape == (512, 7)
    with pytest.raises(ConfigError, match="--ft_proj_selector=4 is out of range"):
        convert.convert_variables(r18_reference, ft_proj_selector=4)


def test_an_existing_workdir_is_not_overwritten(converted, fixtures_dir, tmp_path):
    source = str(fixtures_dir / "r18_cifar" / "model_dir")
    with pytest.raises(ConfigError, match="already holds a workdir"):
        convert.convert(source, converted("r18_cifar"))  # its checkpoint
    (tmp_path / "config.json").write_text("{}")  # a config.json alone
    with pytest.raises(ConfigError, match="already holds a workdir"):
        convert.convert(source, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == "{}"


def test_a_missing_source_is_a_missing_path(tmp_path):
    with pytest.raises(MissingPathError, match="is not a TF checkpoint"):
        reference_checkpoint.read_reference(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPathError, match="is not a TF checkpoint"):
        reference_checkpoint.read_reference(str(tmp_path / "empty"))


# ------------------------------------------------------------------ CLI and protocols


def _run_convert(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # As a user runs it: the CLI quiets TensorFlow.
    return subprocess.run(
        [sys.executable, "-m", "simclr_jax.convert", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_bad_from_is_one_error_line(tmp_path):
    proc = _run_convert(f"--from={tmp_path}/missing", f"--out={tmp_path}/out")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: --from='{tmp_path}/missing' is not a TF checkpoint: give a checkpoint prefix "
        "(model_dir/ckpt-0, with ckpt-0.index beside it), a model_dir with a 'checkpoint' file, "
        "or a SavedModel directory / its saved_model/variables/variables prefix"
    ]
    assert not os.path.exists(tmp_path / "out")


def _small_folder(root, per_class_train=20, per_class_test=10):
    """root/{train,test}/<class>/*.jpg from the embedded CIFAR-10 sample (a few hundred)."""
    path = os.path.join(REPO, "simclr_jax", "data", "assets", "cifar10_sample.npz")
    with np.load(path) as data:
        jpeg, offsets, labels = data["jpeg"], data["offsets"], data["labels"]
        classes = data["class_names"]
    counts = {}
    for i, label in enumerate(labels):
        split = "train" if counts.get(label, 0) < per_class_train else "test"
        if counts.get(label, 0) >= per_class_train + per_class_test:
            continue
        counts[label] = counts.get(label, 0) + 1
        folder = root / split / str(classes[label])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(jpeg[offsets[i] : offsets[i + 1]].tobytes())
    return str(root)


@pytest.mark.slow
def test_knn_and_linear_eval_run_on_the_imported_cifar_resnet(converted, tmp_path):
    workdir = converted("r18_cifar")
    data = _small_folder(tmp_path / "data")
    for name, config in (("knn", knn_config.get_config()), ("linear_eval", None)):
        if config is None:
            config = linear_config.get_config()
            config.linear.epochs = 2.0
            config.linear.batch_size = 50
        config.init_from = workdir
        config.data.source, config.data.name = "folder", data
        config.eval.batch_size = 50
        config.eval.num_devices = 1
        config.eval.knn_k = 5
        results = protocols.run(name, config, str(tmp_path / name))
        assert results["checkpoint"]["path"] == os.path.join(workdir, "checkpoints", "0")
        assert 0.0 <= results["top1"] <= 1.0
