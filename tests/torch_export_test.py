"""PyTorch export: torchvision key layout, numeric parity of the plain-torch encoder, files, CLI.

Parity: our Flax encoder (inference mode) against simclr_jax.torch_resnet.ResNetEncoder loaded
strictly with the exported state_dict, on random weights whose BatchNorm scales, biases and
running statistics are random too (so every BN, the zero-initialised last ones included,
matters). The key layout is checked against torchvision's own resnet18/resnet50 state_dict
names and shapes, pinned in fixtures/torchvision_resnet_keys.json (generated from torchvision,
which cannot be installed next to this project's CPU torch).
"""

import json
import os
import subprocess
import sys
import uuid

import flax
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from optional_deps import import_or_skip

torch = import_or_skip("torch", "torch")
import_or_skip("safetensors", "torch")

# torch_resnet imports torch: after the skip above.
from simclr_jax import cli, export, files, models, torch_export, torch_resnet  # noqa: E402
from simclr_jax.config_checks import ConfigError  # noqa: E402
from simclr_jax.eval import pretrained as pretrained_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "torchvision_resnet_keys.json")

# float32 tolerances on max |flax h - torch h| (h is O(1): max |h| 0.6-1.2, mean 0.12-0.17).
# Measured over seeds 0-2 (random weights and BN statistics, XLA:CPU op by op vs torch CPU):
# ResNet-18 CIFAR at 32 px <= 1.2e-7, full-width ResNet-50 ImageNet stem at 64 px <= 2.4e-7
# (a few float32 ulps of h); the tolerances leave a ~17x margin for other CPUs' kernels.
R18_CIFAR_ATOL = 2e-6
R50_ATOL = 4e-6


def model_config(depth, cifar_stem, **extra):
    cfg = {"depth": depth, "width_multiplier": 1, "cifar_stem": cifar_stem, "sk_ratio": 0.0}
    cfg.update(bn_epsilon=1e-5, bn_momentum=0.9, dtype="float32", **extra)
    return mlc.ConfigDict(cfg)


def variable_shapes(cfg, size):
    """The encoder's {'params', 'batch_stats'} shapes, without computing anything."""
    encoder = models.build_encoder(cfg)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return encoder, jax.eval_shape(
        lambda x: encoder.init(jax.random.key(0), x, train=False), images
    )


def random_variables(cfg, size, seed=0):
    """Random encoder variables: He-scaled convs, BN scale/bias/mean/var all non-trivial.

    Drawn with NumPy from the shapes (no Flax init to compile). BN scales in [0.2, 0.6] keep a
    50-layer residual stack's activations O(1) so the tolerance can be stated relative to h.
    """
    rng = np.random.default_rng(seed)
    encoder, shapes = variable_shapes(cfg, size)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
        low, high = {"scale": (0.2, 0.6), "bias": (-0.2, 0.2), "mean": (-0.2, 0.2)}.get(
            name,
            (0.5, 2.0),  # var
        )
        return rng.uniform(low, high, leaf.shape).astype(np.float32)

    return encoder, jax.tree_util.tree_map_with_path(draw, shapes)


def flax_h(encoder, variables, images_nhwc):
    # Op by op, not jitted: XLA:CPU takes ~2 minutes to compile a whole ResNet-50 on 2 cores,
    # its ops one by one take seconds.
    return np.asarray(encoder.apply(variables, images_nhwc, train=False))


def torch_h(model, images_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(np.transpose(images_nhwc, (0, 3, 1, 2)).copy())).numpy()


def images(size, n=4, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def assert_same_state(loaded, state):
    assert sorted(loaded) == sorted(state)  # safetensors does not keep the order
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)
        assert loaded[key].dtype == torch.from_numpy(value).dtype, key


# --- Numeric parity, through the written files. ---------------------------------------------


def test_resnet18_cifar_torch_copy_matches_flax_through_pt_file(tmp_path):
    cfg = model_config(18, cifar_stem=True)
    encoder, variables = random_variables(cfg, 32)
    state = torch_export.torchvision_state_dict(
        variables["params"], variables["batch_stats"], step=7
    )
    assert state["bn1.num_batches_tracked"].dtype == np.int64
    path = torch_export.save_state_dict(state, str(tmp_path / "r18.pt"), "torchvision", {})
    loaded, metadata = torch_export.load_state_dict(path)
    assert metadata == {}
    assert_same_state(loaded, state)
    # A torch.save file holds no config: the architecture is read off the names and shapes.
    model = torch_export.load_torch_encoder(path)
    assert isinstance(model.maxpool, torch.nn.Identity) and not model.training
    x = images(32)
    expected, got = flax_h(encoder, variables, x), torch_h(model, x)
    assert got.shape == expected.shape == (4, 512)
    assert np.abs(got - expected).max() <= R18_CIFAR_ATOL, np.abs(got - expected).max()


def test_resnet50_torch_copy_matches_flax_through_safetensors_file(tmp_path):
    cfg = model_config(50, cifar_stem=False)
    encoder, variables = random_variables(cfg, 64)
    state = torch_export.torchvision_state_dict(variables["params"], variables["batch_stats"])
    metadata = {torch_export.MODEL_CONFIG_KEY: cfg.to_json(), torch_export.STEP_KEY: "0"}
    path = str(tmp_path / "r50.safetensors")
    torch_export.save_state_dict(state, path, "safetensors", metadata)
    loaded, read_metadata = torch_export.load_state_dict(path)
    assert read_metadata == metadata
    assert_same_state(loaded, state)
    model = torch_export.load_torch_encoder(path)  # built from the stored config
    x = images(64)  # 64 px: the stem's max-pool sees an even 32x32 map, where 'SAME' matters
    expected, got = flax_h(encoder, variables, x), torch_h(model, x)
    assert got.shape == expected.shape == (4, 2048)
    assert np.abs(got - expected).max() <= R50_ATOL, np.abs(got - expected).max()
    # torchvision's own max-pool (padding 1 on both sides) picks other windows: not our model.
    model.maxpool = torch.nn.MaxPool2d(3, 2, padding=1)
    assert np.abs(torch_h(model, x) - expected).max() > 1e-3  # measured 7.7e-3


def test_both_formats_round_trip_through_remote_storage():
    """gs:// and other remote outputs go through simclr_jax.files (here its ram:// backend)."""
    _, variables = random_variables(model_config(18, cifar_stem=True, base_width=4), 32)
    state = torch_export.torchvision_state_dict(variables["params"], variables["batch_stats"])
    workdir = f"ram://torch_export_test_{uuid.uuid4().hex}"
    files.makedirs(workdir)
    for name, fmt in (("e.pt", "torchvision"), ("e.safetensors", "safetensors")):
        path = torch_export.save_state_dict(state, f"{workdir}/{name}", fmt, {"step": "3"})
        loaded, metadata = torch_export.load_state_dict(path)
        assert_same_state(loaded, state)
        assert metadata == ({"step": "3"} if fmt == "safetensors" else {})


@pytest.mark.parametrize("size", [7, 8, 9, 16])
def test_same_pad_max_pool_is_tensorflow_same_pooling(size):
    x = np.maximum(np.random.default_rng(size).normal(size=(2, size, size, 3)), 0)
    x = x.astype(np.float32)  # post-ReLU, as in the stem
    expected = flax.linen.max_pool(jnp.asarray(x), (3, 3), strides=(2, 2), padding="SAME")
    got = torch_h_pool(x)
    np.testing.assert_array_equal(got, np.asarray(expected))


def torch_h_pool(x_nhwc):
    out = torch_resnet.SamePadMaxPool()(torch.from_numpy(np.transpose(x_nhwc, (0, 3, 1, 2))))
    return np.transpose(out.numpy(), (0, 2, 3, 1))


# --- Layout against torchvision's state_dict names and shapes. --------------------------------


def exported_shapes(cfg, size):
    _, shapes = variable_shapes(cfg, size)
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    state = torch_export.torchvision_state_dict(zeros["params"], zeros["batch_stats"])
    return [[k, list(v.shape)] for k, v in state.items()]


def torchvision_keys(name):
    with open(FIXTURE) as f:
        return json.load(f)[name]


def test_resnet50_export_has_torchvision_resnet50_keys_and_shapes_less_fc():
    cfg = model_config(50, cifar_stem=False)
    expected = [e for e in torchvision_keys("resnet50") if not e[0].startswith("fc.")]
    assert exported_shapes(cfg, 64) == expected
    assert torch_export.loads_into_torchvision(cfg)
    # Our torch builder has exactly the same state_dict, so it loads strictly too.
    built = torch_export.build_torch_encoder(cfg).state_dict()
    assert [[k, list(v.shape)] for k, v in built.items()] == expected


def test_resnet18_cifar_export_differs_from_torchvision_resnet18_where_expected():
    """Our CIFAR ResNet-18 vs torchvision's resnet18: exactly three differences.

    1. conv1 is the CIFAR stem's 3x3 conv, torchvision's the ImageNet 7x7.
    2. layer1.0 has a projection shortcut (layer1.0.downsample.*), as the reference's first
       block of every stage; torchvision's resnet18 has none where the shapes match.
    3. No fc (the export is the encoder).
    """
    ours = dict(exported_shapes(model_config(18, cifar_stem=True), 32))
    theirs = dict(torchvision_keys("resnet18"))
    downsample = {
        f"layer1.0.downsample.{k}": s
        for k, s in [("0.weight", [64, 64, 1, 1]), ("1.weight", [64]), ("1.bias", [64]),
                     ("1.running_mean", [64]), ("1.running_var", [64]),
                     ("1.num_batches_tracked", [])]
    }  # fmt: skip
    assert ours.pop("conv1.weight") == [64, 3, 3, 3]
    assert theirs.pop("conv1.weight") == [64, 3, 7, 7]
    assert {k: ours.pop(k) for k in downsample} == downsample
    assert {k: theirs.pop(k) for k in ("fc.weight", "fc.bias")} == {
        "fc.weight": [1000, 512],
        "fc.bias": [1000],
    }
    assert ours == theirs
    assert not torch_export.loads_into_torchvision(model_config(18, cifar_stem=True))
    assert not torch_export.loads_into_torchvision(model_config(18, cifar_stem=False))
    assert not torch_export.loads_into_torchvision(model_config(50, cifar_stem=True))
    assert not torch_export.loads_into_torchvision(model_config(50, False, width_multiplier=2))
    not_torch_eps = model_config(50, cifar_stem=False)
    not_torch_eps.bn_epsilon = 1e-3  # loads, but torchvision's BN would use 1e-5
    assert not torch_export.loads_into_torchvision(not_torch_eps)


# --- What cannot be exported, and a missing torch. -------------------------------------------


def test_selective_kernels_are_refused_with_one_line():
    cfg = model_config(50, cifar_stem=False)
    cfg.sk_ratio = 0.0625
    with pytest.raises(ConfigError, match="no torchvision layout") as info:
        torch_export.check_exportable(cfg)
    assert "\n" not in cli.error_line(info.value)
    _, shapes = variable_shapes(cfg, 64)  # the ResNet-D stem and sk2 layers have no mapping
    with pytest.raises(ConfigError, match="no torchvision layout"):
        torch_export.torchvision_state_dict(shapes["params"], shapes["batch_stats"])


def test_missing_torch_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    # Raised before the checkpoint is read (there is none here).
    with pytest.raises(torch_export.MissingDependencyError) as info:
        export.export_encoder("unused", str(tmp_path / "e.pt"), fmt="torchvision")
    line = cli.error_line(info.value)
    assert "\n" not in line and "pip install -e '.[torch]'" in line


def test_wrong_suffix_for_the_format_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        export.export_encoder("unused", str(tmp_path / "e.pt"), fmt="safetensors")
    with pytest.raises(ConfigError, match=r"\.pt"):
        export.export_encoder("unused", str(tmp_path / "e.npz"), fmt="torchvision")
    with pytest.raises(ConfigError, match="format"):
        export.export_encoder("unused", str(tmp_path / "e.onnx"), fmt="onnx")


# --- The CLI. ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_writes_each_format_and_the_torch_copy_matches_the_checkpoint(
    tiny_pretrained_run, tmp_path
):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    outs = {"npz": "e.npz", "torchvision": "e.pt", "safetensors": "e.safetensors"}
    for fmt, name in outs.items():
        cmd = [sys.executable, "-m", "simclr_jax.export", f"--workdir={tiny_pretrained_run}",
               f"--format={fmt}", f"--out={tmp_path / name}"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert os.path.getsize(tmp_path / name) > 0
    pretrained = pretrained_lib.load_pretrained(tiny_pretrained_run)
    variables = pretrained.variables("encoder")
    variables = {k: v["encoder"] for k, v in variables.items()}
    encoder = models.build_encoder(pretrained.model_config)
    x = images(32)
    expected = flax_h(encoder, variables, x)
    for name in ("e.pt", "e.safetensors"):
        got = torch_h(torch_export.load_torch_encoder(str(tmp_path / name)), x)
        assert np.abs(got - expected).max() <= R18_CIFAR_ATOL, name
    state, metadata = torch_export.load_state_dict(str(tmp_path / "e.safetensors"))
    assert json.loads(metadata["model_config"])["base_width"] == 4
    assert int(metadata["step"]) == pretrained.step == int(state["bn1.num_batches_tracked"])
    # An unknown format is refused before the checkpoint is read: one line, status 2.
    cmd = [sys.executable, "-m", "simclr_jax.export", f"--workdir={tmp_path / 'none'}",
           "--format=onnx", f"--out={tmp_path / 'e.onnx'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
