"""Every input a run will use is opened or checked before its first step.

A mistyped eval split used to surface only after pretraining finished, or after the kNN
protocol had extracted the train split's features. Each test makes the work that would come
first (the train step, feature extraction, the fine-tuning pipeline) fail loudly if it is
reached, so a check that happens late fails the test.
"""

import os

import pytest
from PIL import Image
from tiny_run import tiny_config

from configs import finetune as finetune_config
from configs import knn as knn_config
from configs import linear_eval as linear_config
from simclr_jax import config_checks, steps, train
from simclr_jax.data import pipeline, sources
from simclr_jax.eval import features, finetune, knn, linear


def _reached(*_, **__):
    raise AssertionError("the run started its work before checking its inputs")


@pytest.mark.parametrize(
    "field,knn_on,every_epochs",
    [("eval_split", True, 0.0), ("eval_split", False, 0.5), ("train_split", False, 0.0)],
)
def test_pretraining_checks_every_split_before_the_first_step(
    tmp_path, monkeypatch, field, knn_on, every_epochs
):
    monkeypatch.setattr(steps, "compile_train_step", _reached)
    monkeypatch.setattr(pipeline, "build_pretrain_dataset", _reached)
    config = tiny_config(eval__knn=knn_on, eval__every_epochs=every_epochs)
    config.data[field] = "val"
    with pytest.raises(config_checks.ConfigError) as error:
        train.train_and_evaluate(config, str(tmp_path))
    assert str(error.value) == (
        f"config.data.{field}='val' is invalid: split='val' of the embedded sample: "
        "available ['train', 'test']"
    )
    assert not os.path.exists(tmp_path / "checkpoints")


def test_pretraining_without_evaluation_does_not_need_the_eval_split(tmp_path, monkeypatch):
    monkeypatch.setattr(steps, "compile_train_step", _reached)
    config = tiny_config(eval__knn=False, eval__every_epochs=0.0, data__eval_split="val")
    with pytest.raises(AssertionError, match="started its work"):
        train.train_and_evaluate(config, str(tmp_path))


def _protocol(module, init_from, **fields):
    config = module.get_config()
    config.init_from = init_from
    for key, value in fields.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


@pytest.mark.parametrize("field", ["train_split", "eval_split"])
def test_knn_checks_both_splits_before_extracting_features(
    tiny_pretrained_run, tmp_path, monkeypatch, field
):
    monkeypatch.setattr(features, "extract_encoder_features", _reached)
    config = _protocol(knn_config, tiny_pretrained_run, **{f"data__{field}": "val"})
    with pytest.raises(config_checks.ConfigError, match=rf"^config.data.{field}='val' is invalid"):
        knn.run(config, str(tmp_path))


def test_linear_eval_checks_its_batch_sizes_up_front(tiny_pretrained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(features, "extract_encoder_features", _reached)
    config = _protocol(linear_config, tiny_pretrained_run, linear__mode="reference")
    config.linear.batch_size = 100  # 8 devices
    with pytest.raises(config_checks.ConfigError) as error:
        linear.run(config, str(tmp_path))
    assert str(error.value) == (
        "config.linear.batch_size=100 is invalid: it must be divisible by the 8 devices in use; "
        "try 96 or 104."
    )
    config = _protocol(linear_config, tiny_pretrained_run, eval__batch_size=100)
    with pytest.raises(config_checks.ConfigError, match=r"^config.eval.batch_size=100 is inv"):
        linear.run(config, str(tmp_path))
    config = _protocol(linear_config, tiny_pretrained_run, eval__knn_temperature=0.0)
    with pytest.raises(config_checks.ConfigError, match=r"^config.eval.knn_temperature=0.0 is"):
        linear.run(config, str(tmp_path))


def test_finetune_checks_the_eval_split_before_training(tiny_pretrained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "build_finetune_dataset", _reached)
    monkeypatch.setattr(finetune, "make_train_step", _reached)
    config = _protocol(finetune_config, tiny_pretrained_run, data__eval_split="validation")
    with pytest.raises(config_checks.ConfigError, match=r"^config.data.eval_split='validation'"):
        finetune.run(config, str(tmp_path))
    config = _protocol(finetune_config, tiny_pretrained_run, finetune__batch_size=12)
    with pytest.raises(config_checks.ConfigError, match=r"^config.finetune.batch_size=12 is"):
        finetune.run(config, str(tmp_path))


def test_open_split_names_the_field_for_every_source(tmp_path):
    folder = tmp_path / "images"
    for split in ("train", "test"):
        os.makedirs(folder / split / "cat")
        Image.new("RGB", (8, 8)).save(folder / split / "cat" / "0.png")
    data = knn_config.get_config().data
    data.source, data.name, data.eval_split = "folder", str(folder), "val"
    with pytest.raises(config_checks.ConfigError) as error:
        sources.open_split(data, "eval_split")
    assert str(error.value).startswith(
        f"config.data.eval_split='val' is invalid: split='val' not found in image folder "
        f"{str(folder)!r}"
    )
    assert "available splits ['test', 'train']" in str(error.value)


def test_batches_larger_than_their_data_fail_up_front(tiny_pretrained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "build_pretrain_dataset", _reached)
    monkeypatch.setattr(pipeline, "build_finetune_dataset", _reached)
    monkeypatch.setattr(features, "extract_encoder_features", _reached)
    with pytest.raises(config_checks.ConfigError) as error:
        train.train_and_evaluate(tiny_config(train__batch_size=8192), str(tmp_path / "p"))
    assert str(error.value) == (
        "config.train.batch_size=8192 is invalid: it is larger than the 4000 examples it is "
        "drawn from ('cifar10_sample', split 'train'); lower it."
    )
    config = _protocol(linear_config, tiny_pretrained_run, linear__mode="reference")
    config.linear.batch_size = 8192
    with pytest.raises(config_checks.ConfigError, match=r"^config.linear.batch_size=8192 is inv"):
        linear.run(config, str(tmp_path / "l"))
    # 10% of the labels: 400 examples.
    config = _protocol(finetune_config, tiny_pretrained_run, finetune__batch_size=512)
    with pytest.raises(config_checks.ConfigError, match=r"larger than the 400 examples"):
        finetune.run(config, str(tmp_path / "f"))
