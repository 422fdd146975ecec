"""Tests of simclr_jax.data.sources: embedded, tfds and image-folder sources.

Expected values come from independent readers: the .npz read with NumPy, images
decoded with PIL, tfds's own even_splits for the host ranges.
"""

import io
import os
import tarfile
import time
import warnings

import ml_collections as mlc
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from simclr_jax.config_checks import ConfigError, MissingPathError
from simclr_jax.data import sources
from simclr_jax.data.sources import base, embedded, folder

TINY_TRAIN, TINY_TEST = 23, 7


class DatasetsTestTiny(tfds.core.GeneratorBasedBuilder):
    """A tiny grayscale tfds dataset, prepared offline into a temp data_dir."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 1)),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(0, TINY_TRAIN),
            "test": self._generate_examples(1000, TINY_TEST),
        }

    def _generate_examples(self, start, count):
        for i in range(start, start + count):
            yield i, {"image": tiny_image(i), "label": i % 3}


def tiny_image(i):
    """Example i of the tiny tfds dataset: 1 channel, sizes vary."""
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (5 + i % 3, 6, 1), np.uint8)


def data_config(**overrides):
    cfg = mlc.ConfigDict(
        {
            "source": "embedded",
            "name": "cifar10_sample",
            "data_dir": None,
            "download": False,
            "train_split": "train",
            "eval_split": "test",
            "val_fraction": 0.0,
            "strict": False,
            "cache": None,
            "extract_dir": None,
        }
    )
    cfg.update(overrides)
    return cfg


def read_all(source, process_index=0, process_count=1):
    return list(source.shard(process_index, process_count).as_numpy_iterator())


def encode(array, fmt, mode=None, **kwargs):
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def pil_rgb(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder = DatasetsTestTiny(data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return data_dir


@pytest.fixture(scope="module")
def messy_tree(tmp_path_factory):
    """root/{train,test}/{cat,dog}/ with odd modes and formats plus three bad files."""
    root = str(tmp_path_factory.mktemp("messy"))
    rng = np.random.default_rng(0)

    def pixels(h=9, w=11):
        return rng.integers(0, 256, (h, w, 3), np.uint8)

    good = {
        "train/cat/a_rgb.jpg": encode(pixels(), "JPEG", quality=95),
        "train/cat/b_gray.JPG": encode(pixels(), "JPEG", "L", quality=95),
        "train/cat/c_cmyk.jpeg": encode(pixels(), "JPEG", "CMYK", quality=95),
        "train/cat/d_rgba.png": encode(np.dstack([pixels(), pixels()[..., :1]]), "PNG"),
        "train/dog/e_palette.PNG": encode(pixels(), "PNG", "P"),
        "train/dog/f.bmp": encode(pixels(7, 5), "BMP"),
        "train/dog/g.webp": encode(pixels(), "WEBP", lossless=True),
        "train/dog/h_big.png": encode(pixels(40, 33), "PNG"),
        "test/cat/i.png": encode(pixels(), "PNG"),
        "test/dog/j.jpg": encode(pixels(), "JPEG"),
    }
    jpeg = encode(pixels(), "JPEG")
    bad = {
        "train/cat/truncated.jpg": jpeg[: len(jpeg) // 2],
        "train/dog/empty.jpg": b"",
        "train/dog/notes.jpg": b"this is a text file, not an image\n",
    }
    for rel, data in {**good, **bad}.items():
        write(os.path.join(root, rel), data)
    write(os.path.join(root, "train/dog/readme.txt"), b"ignored: not an image extension")
    return root, sorted(good), sorted(bad)


# ----------------------------------------------------------------------------
# Embedded sample.


def test_embedded_matches_npz_and_pil():
    with np.load(embedded.embedded_sample_path()) as f:
        arrays = {k: f[k] for k in f.files}
    for split, split_id, count in [("train", 0, 4000), ("test", 1, 1000)]:
        source = sources.load_source(data_config(), split)
        rows = np.flatnonzero(arrays["split"] == split_id)
        assert source.num_examples == len(rows) == count
        assert source.class_names == tuple(arrays["class_names"])
        if split == "test":
            examples = read_all(source)
            np.testing.assert_array_equal([e["label"] for e in examples], arrays["labels"][rows])
            for e, row in zip(examples[:50], rows[:50], strict=True):
                blob = arrays["jpeg"][arrays["offsets"][row] : arrays["offsets"][row + 1]]
                expected = np.asarray(Image.open(io.BytesIO(blob.tobytes())).convert("RGB"))
                assert e["image"].dtype == np.uint8 and e["image"].shape == (32, 32, 3)
                assert np.abs(e["image"].astype(int) - expected).max() <= 2


# ----------------------------------------------------------------------------
# Host sharding: disjoint, complete, balanced, identical content.


def shard_partition_check(source):
    reference = {int(e["index"]): e for e in read_all(source)}
    assert sorted(reference) == list(range(source.num_examples))
    for count in (1, 2, 4):
        seen = []
        for p in range(count):
            shard = read_all(source, p, count)
            indices = [int(e["index"]) for e in shard]
            np.testing.assert_array_equal(indices, source.shard_indices(p, count))
            assert len(shard) in (source.num_examples // count, -(-source.num_examples // count))
            for e in shard:
                ref = reference[int(e["index"])]
                assert e["label"] == ref["label"]
                np.testing.assert_array_equal(e["image"], ref["image"])
            seen += indices
        assert sorted(seen) == list(range(source.num_examples)), count  # Disjoint and complete.


def test_shards_embedded():
    shard_partition_check(sources.load_source(data_config(), "test"))


def test_shards_folder(messy_tree):
    root, _, _ = messy_tree
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", folder.UnreadableImageWarning)
        shard_partition_check(sources.load_source(data_config(source="folder", name=root), "train"))


def test_shards_tfds_match_even_splits(tiny_tfds_dir):
    cfg = data_config(source="tfds", name="datasets_test_tiny", data_dir=tiny_tfds_dir)
    source = sources.load_source(cfg, "train")
    assert (source.num_examples, source.class_names) == (TINY_TRAIN, ("a", "b", "c"))
    shard_partition_check(source)
    builder = tfds.builder("datasets_test_tiny", data_dir=tiny_tfds_dir)
    for count in (2, 4):
        for p, sub in enumerate(tfds.even_splits("train", count)):
            (inst,) = sub.to_absolute(builder.info.splits)
            lo, hi = inst.from_ or 0, TINY_TRAIN if inst.to is None else inst.to
            np.testing.assert_array_equal(source.shard_indices(p, count), np.arange(lo, hi))


def test_tfds_grayscale_to_rgb_and_split_sums(tiny_tfds_dir):
    cfg = data_config(source="tfds", name="datasets_test_tiny", data_dir=tiny_tfds_dir)
    source = sources.load_source(cfg, "train+test")
    assert source.num_examples == TINY_TRAIN + TINY_TEST
    examples = read_all(source, 1, 2)
    assert [int(e["index"]) for e in examples] == list(range(12, 23)) + list(range(27, 30))
    # tfds shuffles examples when writing, so match the expected example by content.
    expected = {tiny_image(i).tobytes(): i for i in [*range(TINY_TRAIN), *range(1000, 1007)]}
    for e in examples:
        assert e["image"].shape[2] == 3 and e["image"].dtype == np.uint8
        np.testing.assert_array_equal(e["image"][..., 0], e["image"][..., 2])
        key = expected[e["image"][..., :1].tobytes()]
        assert e["label"] == key % 3


def test_tfds_mock_cifar10_shards(tmp_path):
    """tfds.testing.mock_data with split-aware fake data under the real 'cifar10' name."""
    data_dir = str(tmp_path)
    builder = tfds.builder("cifar10", data_dir=data_dir)
    sizes = {"train": 10, "test": 5}
    builder.info.set_splits(
        tfds.core.SplitDict(
            [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in sizes.items()]
        )
    )
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)

    def fake(split, i):
        return np.random.default_rng([len(split), i]).integers(0, 256, (32, 32, 3), np.uint8)

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        # mock_data ignores split slicing by default; this honours it.
        del decoders, read_config, kwargs
        rows = []
        for inst in split.to_absolute(self.info.splits):
            end = sizes[inst.splitname] if inst.to is None else inst.to
            rows += [(inst.splitname, i) for i in range(inst.from_ or 0, end)]
        return tf.data.Dataset.from_tensor_slices(
            {
                "id": [f"{s}{i}" for s, i in rows],
                "image": [tf.io.encode_png(fake(s, i)).numpy() for s, i in rows],
                "label": np.array([i % 10 for _, i in rows], np.int64),
            }
        )

    cfg = data_config(source="tfds", name="cifar10", data_dir=data_dir)
    policy = tfds.testing.MockPolicy.USE_FILES
    with tfds.testing.mock_data(policy=policy, data_dir=data_dir, as_dataset_fn=as_dataset):
        source = sources.load_source(cfg, "train+test")
        assert (source.num_examples, source.num_classes) == (15, 10)
        rows = [("train", i) for i in range(10)] + [("test", i) for i in range(5)]
        for count in (1, 2, 4):
            seen = []
            for p in range(count):
                for e in read_all(source, p, count):
                    split, i = rows[e["index"]]
                    np.testing.assert_array_equal(e["image"], fake(split, i))
                    assert e["label"] == i % 10
                    seen.append(int(e["index"]))
            assert sorted(seen) == list(range(15))


# ----------------------------------------------------------------------------
# Image folders.


def test_folder_skips_bad_files_and_converts_modes(messy_tree):
    root, good, bad = messy_tree
    with pytest.warns(folder.UnreadableImageWarning) as record:
        source = sources.load_source(data_config(source="folder", name=root), "train")
    (warning,) = [w for w in record if w.category is folder.UnreadableImageWarning]
    message = str(warning.message)
    assert "skipped 3 unreadable" in message
    for rel in bad:
        assert os.path.join(root, rel) in message
    assert source.class_names == ("cat", "dog")
    train_good = [g for g in good if g.startswith("train/")]
    assert source.num_examples == len(train_good)
    examples = read_all(source)
    # Fixed order: by class, then file name; labels follow the sorted class names.
    for e, rel in zip(examples, train_good, strict=True):
        assert e["label"] == ("cat", "dog").index(rel.split("/")[1])
        expected = pil_rgb(os.path.join(root, rel))
        assert e["image"].shape == expected.shape and e["image"].dtype == np.uint8
        tolerance = 2 if rel.lower().endswith((".jpg", ".jpeg")) else 0
        assert np.abs(e["image"].astype(int) - expected).max() <= tolerance, rel


def test_folder_decodes_by_content_png_named_jpeg_and_cmyk_jpeg(tmp_path):
    """The decoder follows the bytes, not the extension; CMYK JPEGs become PIL's RGB.

    Measured here (TF 2.21's decode_jpeg, INTEGER_ACCURATE, against PIL's decode and
    convert('RGB')) over 40 CMYK JPEGs of random and smooth content at quality 75 and 95:
    max |difference| 0. Allowed: 1, for another libjpeg build.
    """
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (13, 17, 3), np.uint8)
    alpha = rng.integers(0, 256, (13, 17, 1), np.uint8)
    yy, xx = np.mgrid[0:24, 0:20]
    smooth = np.stack([yy * 10, xx * 12, (yy + xx) * 5], -1).astype(np.uint8)
    files = {  # class/file -> (bytes, expected pixels or None for PIL's, codec)
        "a/png_named.JPEG": (encode(rgb, "PNG"), rgb, base.CODEC_PNG),
        "a/rgba_png_named.jpg": (encode(np.dstack([rgb, alpha]), "PNG"), rgb, base.CODEC_PNG),
        "b/cmyk.jpeg": (encode(rgb, "JPEG", "CMYK", quality=90), None, base.CODEC_JPEG),
        "b/cmyk_smooth.jpg": (encode(smooth, "JPEG", "CMYK", quality=75), None, base.CODEC_JPEG),
        "b/jpeg_named.png": (encode(rgb, "JPEG", quality=90), None, base.CODEC_JPEG),
    }
    for rel, (data, _, _) in files.items():
        write(str(tmp_path / "train" / rel), data)
    with Image.open(tmp_path / "train" / "b" / "cmyk.jpeg") as image:
        assert image.mode == "CMYK"
    source = sources.load_source(
        data_config(source="folder", name=str(tmp_path), strict=True), "train"
    )
    assert source.class_names == ("a", "b") and source.num_examples == len(files)
    np.testing.assert_array_equal(source.table.codecs, [c for _, _, c in files.values()])
    for e, (rel, (_, expected, _)) in zip(read_all(source), files.items(), strict=True):
        assert e["label"] == ("a", "b").index(rel[0])
        assert e["image"].dtype == np.uint8
        if expected is not None:  # A PNG, whatever its name: exactly its pixels.
            np.testing.assert_array_equal(e["image"], expected, err_msg=rel)
        else:
            pil = pil_rgb(str(tmp_path / "train" / rel))
            assert e["image"].shape == pil.shape, rel
            assert np.abs(e["image"].astype(int) - pil).max() <= 1, rel
    # The CMYK JPEG really is the colour image (PIL's naive RGB->CMYK round trip + JPEG loss).
    cmyk = read_all(source)[2]["image"].astype(int)
    assert np.abs(cmyk - rgb).mean() < 20


def test_folder_strict_raises_with_path(messy_tree):
    root, _, bad = messy_tree
    with pytest.raises(ValueError, match="unreadable image") as error:
        sources.load_source(data_config(source="folder", name=root, strict=True), "train")
    assert any(os.path.join(root, rel) in str(error.value) for rel in bad)


def test_folder_archive_matches_directory(messy_tree, tmp_path):
    root, _, _ = messy_tree
    archive = str(tmp_path / "images.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="wrapper")  # A single top folder, as archives often have.
    cfg = data_config(source="folder", name=archive, extract_dir=str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", folder.UnreadableImageWarning)
        from_dir = read_all(sources.load_source(data_config(source="folder", name=root), "train"))
        from_tar = read_all(sources.load_source(cfg, "train"))
        extracted = os.listdir(tmp_path / "cache")
        sources.load_source(cfg, "test")  # Reuses the extracted tree.
    assert os.listdir(tmp_path / "cache") == extracted and len(extracted) == 1
    assert len(from_tar) == len(from_dir)
    for a, b in zip(from_dir, from_tar, strict=True):
        assert a["label"] == b["label"]
        np.testing.assert_array_equal(a["image"], b["image"])


@pytest.fixture
def class_tree(tmp_path):
    """root/<class>/ with 10, 7 and 4 PNGs whose first pixel encodes their id."""
    root = tmp_path / "classes"
    ids = {}
    for label, (cls, count) in enumerate([("ant", 10), ("bee", 7), ("cow", 4)]):
        for i in range(count):
            array = np.full((4, 4, 3), 0, np.uint8)
            array[0, 0] = (label, i, 7)
            write(str(root / cls / f"{i:02d}.png"), encode(array, "PNG"))
            ids[(label, i)] = f"{cls}/{i:02d}.png"
    return str(root), ids


def test_folder_val_fraction_is_stratified_and_seeded(class_tree):
    root, ids = class_tree
    cfg = data_config(source="folder", name=root, val_fraction=0.3)

    def keys(split, seed):
        return {
            tuple(e["image"][0, 0, :2])
            for e in read_all(sources.load_source(cfg, split, seed=seed))
        }

    train, held = keys("train", 0), keys("test", 0)
    assert not train & held and train | held == set(ids)
    for label, count in enumerate([10, 7, 4]):
        assert sum(1 for k in held if k[0] == label) == round(0.3 * count)
    assert keys("test", 0) == held
    assert keys("test", 1) != held
    with pytest.raises(ValueError, match=r"split='test' not found.*val_fraction"):
        sources.load_source(data_config(source="folder", name=root), "test")


def test_folder_holds_out_when_eval_folder_missing(class_tree, tmp_path):
    root, ids = class_tree
    nested = tmp_path / "nested"
    os.makedirs(nested)
    os.rename(root, nested / "train")
    cfg = data_config(source="folder", name=str(nested), val_fraction=0.25)
    train = sources.load_source(cfg, "train").num_examples
    test = sources.load_source(cfg, "test").num_examples
    # round(0.25 * n) for n = 10, 7, 4 is 2, 2, 1 (Python rounds halves to even).
    assert train + test == len(ids) and test == 5


# ----------------------------------------------------------------------------
# Errors.


def test_folder_errors(tmp_path):
    with pytest.raises(MissingPathError, match="no such image folder"):
        sources.load_source(data_config(source="folder", name=str(tmp_path / "nope")), "train")
    empty = tmp_path / "empty"
    os.makedirs(empty / "cat")
    with pytest.raises(ConfigError, match="found no images"):
        sources.load_source(data_config(source="folder", name=str(empty)), "train")
    flat = tmp_path / "flat"
    write(str(flat / "x.png"), encode(np.zeros((2, 2, 3), np.uint8), "PNG"))
    with pytest.raises(ConfigError, match="class folders"):
        sources.load_source(data_config(source="folder", name=str(flat)), "train")
    split_tree = tmp_path / "splits"
    write(str(split_tree / "train" / "cat" / "x.png"), encode(np.zeros((2, 2, 3), np.uint8), "PNG"))
    with pytest.raises(ConfigError, match=r"split='val' not found.*\['train'\]"):
        sources.load_source(data_config(source="folder", name=str(split_tree)), "val")


def test_config_and_embedded_errors():
    with pytest.raises(ConfigError, match=r"data.source='hdf5'"):
        sources.load_source(data_config(source="hdf5"), "train")
    with pytest.raises(ConfigError, match=r"split='validation'.*\['train', 'test'\]"):
        sources.load_source(data_config(), "validation")
    with pytest.raises(ConfigError, match="val_fraction"):
        sources.load_source(data_config(source="tfds", name="cifar10", val_fraction=0.1), "train")


def test_tfds_errors(tmp_path, tiny_tfds_dir):
    with pytest.raises(ConfigError, match=r"'cifar11' is not a tfds dataset.*cifar10"):
        sources.load_source(data_config(source="tfds", name="cifar11"), "train")
    cfg = data_config(source="tfds", name="datasets_test_tiny", data_dir=tiny_tfds_dir)
    with pytest.raises(ConfigError, match=r"split='validation'.*\['train', 'test'\]"):
        sources.load_source(cfg, "validation")
    # Not prepared and download=False: a fast, explicit error, never a download.
    for name in ("cifar10", "imagenet2012_subset/1pct"):
        start = time.monotonic()
        with pytest.raises(MissingPathError) as error:
            sources.load_source(
                data_config(source="tfds", name=name, data_dir=str(tmp_path)), "train"
            )
        assert time.monotonic() - start < 10
        message = str(error.value)
        assert name in message and str(tmp_path) in message and "download=True" in message
    assert "manual_dir" in message
