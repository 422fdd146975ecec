"""Tests of simclr_jax.data.pipeline: order, resume, sharding, views, eval padding.

With an identity augmentation (full-image crop, no flip/jitter/grayscale) each
view reproduces its source image exactly, so every example in a batch can be
traced back to the DataSource by its pixels: coverage, labels and host
disjointness are checked against the source, not against the pipeline itself.
The multi-host contract (hosts' local batches laid out by row equal the batch
of one process) is checked by building every host's pipeline in this process
and comparing with the 1-process pipeline, with the real random augmentation.
"""

import math
import os
import subprocess
import sys

import ml_collections as mlc
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from simclr_jax.data import order, pipeline, views
from simclr_jax.data import sources as sources_lib

SIZE = 12
NUM_TRAIN = 23


class PipelineTestTiny(tfds.core.GeneratorBasedBuilder):
    """A tiny RGB tfds dataset prepared offline (23 train, 7 test examples)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(0, NUM_TRAIN),
            "test": self._generate_examples(100, 7),
        }

    def _generate_examples(self, start, count):
        for i in range(start, start + count):
            yield i, {"image": random_image(i), "label": i % 3}


def random_image(i):
    return np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), np.uint8)


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
        }
    )
    cfg.update(overrides)
    return cfg


def aug_config(*, identity=False, size=SIZE):
    cfg = views.default_augment_config(size, jitter_strength=0.5, blur_prob=0.0)
    if identity:
        cfg.crop_area_range = (1.0, 1.0)
        cfg.crop_aspect_range = (1.0, 1.0)
        cfg.flip_prob = 0.0
        cfg.jitter_prob = 0.0
        cfg.grayscale_prob = 0.0
    return cfg


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Data configs of the same-sized folder and tfds datasets, keyed by kind."""
    root = tmp_path_factory.mktemp("folder")
    for i in range(NUM_TRAIN):
        path = root / f"class{i % 3}" / f"{i:03d}.png"
        os.makedirs(path.parent, exist_ok=True)
        Image.fromarray(random_image(i)).save(path)
    tfds_dir = str(tmp_path_factory.mktemp("tfds"))
    PipelineTestTiny(data_dir=tfds_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    folder = {"source": "folder", "name": str(root)}
    tiny = {"source": "tfds", "name": "pipeline_test_tiny", "data_dir": tfds_dir}
    return {
        "folder-cached": data_config(**folder, cache=True),
        "folder-uncached": data_config(**folder, cache=False),
        "tfds-cached": data_config(**tiny, cache=True),
        "tfds-stream": data_config(**tiny, cache=False, shuffle_buffer=5),
    }


def source_lookup(cfg, split="train"):
    """{image bytes: (index, label)} read from the DataSource directly."""
    source = sources_lib.load_source(cfg, split)
    table = {}
    for e in source.shard(0, 1).as_numpy_iterator():
        table[e["image"].tobytes()] = (int(e["index"]), int(e["label"]))
    assert len(table) == source.num_examples  # Images are distinct.
    return source, table


def identify(images, table):
    """Source (index, label) of every float image of a batch."""
    pixels = np.round(images * 255).astype(np.uint8)
    return [table[p.tobytes()] for p in pixels]


def take(ds, count):
    it = ds.as_numpy_iterator()
    return [next(it) for _ in range(count)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def assemble(host_batches, rows):
    """The global batch from hosts' local batches: host p's row j is global row rows[p][j]."""
    out = {}
    for k in host_batches[0]:
        size = sum(len(b[k]) for b in host_batches)
        out[k] = np.empty((size,) + host_batches[0][k].shape[1:], host_batches[0][k].dtype)
        for batch, host_rows in zip(host_batches, rows, strict=True):
            out[k][host_rows] = batch[k]
    return out


def global_batches(cfg, aug, *, process_count, global_batch, count, rows=None, **kwargs):
    """`count` global batches assembled from every host's pipeline, built here."""
    local = global_batch // process_count
    explicit = rows is not None
    if not explicit:  # The documented default: host p supplies the block [p*b, (p+1)*b).
        rows = [np.arange(p * local, (p + 1) * local) for p in range(process_count)]
    per_host = []
    for p in range(process_count):
        ds, info = pipeline.build_pretrain_dataset(
            cfg,
            aug,
            global_batch_size=global_batch,
            process_index=p,
            process_count=process_count,
            batch_rows=rows[p] if explicit else None,
            **kwargs,
        )
        per_host.append(take(ds, count))
    return [assemble(step, rows) for step in zip(*per_host, strict=True)], info


KINDS = ["folder-cached", "folder-uncached", "tfds-cached", "tfds-stream"]
GLOBAL_KINDS = ["folder-cached", "folder-uncached", "tfds-cached"]


def test_pretrain_batches_embedded():
    ds, info = pipeline.build_pretrain_dataset(
        data_config(),
        aug_config(size=32),
        global_batch_size=16,
        seed=3,
        process_index=1,
        process_count=2,
    )
    assert (info.local_batch_size, info.steps_per_epoch) == (8, 2000 // 8)
    assert (info.num_examples, info.num_classes, info.cached) == (4000, 10, True)
    for batch in take(ds, 2):
        assert batch.keys() == {"view1", "view2", "label", "index"}
        assert (
            batch["index"].dtype == np.int32
            and ((batch["index"] >= 0) & (batch["index"] < 4000)).all()
        )
        for view in ("view1", "view2"):
            assert batch[view].shape == (8, 32, 32, 3) and batch[view].dtype == np.float32
            assert batch[view].min() >= 0.0 and batch[view].max() <= 1.0
        diff = np.abs(batch["view1"] - batch["view2"]).reshape(8, -1).max(axis=1)
        assert (diff > 0.05).all()
        assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))


@pytest.mark.slow
@pytest.mark.parametrize("kind", GLOBAL_KINDS)
def test_global_batches_do_not_depend_on_the_process_count(sources, kind):
    """Hosts' batches laid out by row are bit-identical to one process's, resumed or not.

    The order logic is shared by all global kinds; the full matrix runs on the
    cached folder, the other kinds (other fetchers) check 2 hosts only.
    """
    cfg, aug = sources[kind], aug_config()  # Random views: the seeds must match too.
    batch = 8  # 23 // 8 = 2 steps per epoch: 5 steps cross two epoch boundaries.
    reference, info = global_batches(cfg, aug, process_count=1, global_batch=batch, count=5, seed=3)
    assert info.steps_per_epoch == NUM_TRAIN // batch and info.global_order
    assert not np.array_equal(reference[0]["view1"], reference[0]["view2"])
    full = kind == "folder-cached"
    for process_count in (2, 4) if full else (2,):
        got, info = global_batches(
            cfg, aug, process_count=process_count, global_batch=batch, count=5, seed=3
        )
        assert info.steps_per_epoch == NUM_TRAIN // batch
        assert_batches_equal(got, reference)
        if full:  # Resuming at step 3 (inside epoch 1) continues the same global stream.
            resumed, _ = global_batches(
                cfg, aug, process_count=process_count, global_batch=batch, count=2, seed=3,
                start_step=3,
            )  # fmt: skip
            assert_batches_equal(resumed, reference[3:])
    if full:  # A mesh that interleaves the processes' devices: hosts supply other rows.
        rows = [np.array([0, 1, 4, 5]), np.array([2, 3, 6, 7])]
        got, _ = global_batches(
            cfg, aug, process_count=2, global_batch=batch, count=3, seed=3, rows=rows
        )
        assert_batches_equal(got, reference[:3])


@pytest.mark.parametrize("kind", GLOBAL_KINDS)
def test_epochs_are_fresh_global_permutations(sources, kind):
    cfg = sources[kind]
    source, table = source_lookup(cfg)
    batch = 6
    steps = NUM_TRAIN // batch  # 3; the remaining 5 examples sit out each epoch.
    batches, _ = global_batches(
        cfg, aug_config(identity=True), process_count=2, global_batch=batch, count=2 * steps, seed=0
    )
    epochs = []
    for epoch_batches in (batches[:steps], batches[steps:]):
        drawn = []
        for b in epoch_batches:
            np.testing.assert_array_equal(b["view1"], b["view2"])  # Identity views.
            ids = identify(b["view1"], table)
            assert [label for _, label in ids] == list(b["label"])
            # 'index' is the drawn example's position in the split (InstDisc's bank row).
            assert [index for index, _ in ids] == list(b["index"])
            drawn += [index for index, _ in ids]
        assert len(set(drawn)) == steps * batch  # Each drawn example once per epoch.
        epochs.append(drawn)
    assert epochs[0] != epochs[1]  # Reshuffled.
    # Both hosts draw from the whole split: host 0's rows are not one shard.
    host0 = {i for b in batches for i, _ in identify(b["view1"][:3], table)}
    assert any(i % 2 for i in host0) and any(i % 2 == 0 for i in host0)


def test_tfds_stream_keeps_a_per_host_order(sources):
    """Record streams: each host permutes its own range, so hosts are disjoint."""
    cfg = sources["tfds-stream"]
    source, table = source_lookup(cfg)
    process_count, batch = 2, 3
    per_epoch = (NUM_TRAIN // process_count) // batch * batch  # 11 // 3 * 3 = 9
    seen_by_host = []
    for p in range(process_count):
        ds, info = pipeline.build_pretrain_dataset(
            cfg,
            aug_config(identity=True),
            global_batch_size=batch * process_count,
            seed=0,
            process_index=p,
            process_count=process_count,
        )
        assert info.steps_per_epoch * batch == per_epoch and not info.global_order
        steps = info.steps_per_epoch
        batches = take(ds, 2 * steps)
        epochs = []
        for epoch_batches in (batches[:steps], batches[steps:]):
            drawn = []
            for b in epoch_batches:
                ids = identify(b["view1"], table)
                assert [label for _, label in ids] == list(b["label"])
                assert [index for index, _ in ids] == list(b["index"])  # Record streams too.
                drawn += [index for index, _ in ids]
            assert len(set(drawn)) == per_epoch  # No repeats within an epoch.
            assert set(drawn) <= set(source.shard_indices(p, process_count))
            epochs.append(drawn)
        assert epochs[0] != epochs[1]  # Reshuffled.
        seen_by_host.append(set(epochs[0]) | set(epochs[1]))
    assert not seen_by_host[0] & seen_by_host[1]


@pytest.mark.parametrize("kind", KINDS)
def test_resume_matches_uninterrupted_run(sources, kind):
    def build(start_step):
        return pipeline.build_pretrain_dataset(
            sources[kind],
            aug_config(),
            global_batch_size=6,
            seed=7,
            process_index=1,
            process_count=2,
            start_step=start_step,
        )

    ds, info = build(0)
    assert info.steps_per_epoch == 3
    full = take(ds, 8)  # Epochs 0, 1 and part of 2.
    # Resuming at step 4 skips epoch 0 by arithmetic and 1 batch of epoch 1, then
    # crosses into epoch 2 at step 6; the stream path also resumes inside epoch 0.
    for k in (2, 4) if kind == "tfds-stream" else (4,):
        assert_batches_equal(take(build(k)[0], 8 - k), full[k:])
    # Epochs see different views of their examples (fresh order and fresh seeds).
    assert not np.array_equal(full[0]["view1"], full[3]["view1"])


def test_seed_determines_the_stream(sources):
    def first_batches(seed):
        ds, _ = pipeline.build_pretrain_dataset(
            sources["folder-cached"], aug_config(), global_batch_size=4, seed=seed
        )
        return take(ds, 2)

    reference = first_batches(11)
    assert_batches_equal(first_batches(11), reference)
    other = first_batches(12)
    assert not np.array_equal(other[0]["view1"], reference[0]["view1"])


def expected_eval_indices(source, process, process_count, global_batch):
    """Split indices a host evaluates, in order, from the documented layout."""
    if not source.indexable:  # tfds: the host's contiguous range.
        return list(source.shard_indices(process, process_count))
    local = global_batch // process_count
    steps = math.ceil(source.num_examples / global_batch)
    positions = [s * global_batch + process * local + j for s in range(steps) for j in range(local)]
    return [i for i in positions if i < source.num_examples]


@pytest.mark.parametrize(
    "kind, process_count, global_batch",
    [
        ("folder-cached", 1, 8),
        ("folder-uncached", 2, 8),
        ("folder-uncached", 4, 32),  # Host 3 holds padding only.
        ("tfds-stream", 3, 9),
        ("tfds-cached", 4, 8),
    ],
)
def test_eval_covers_each_example_once_with_padding(sources, kind, process_count, global_batch):
    cfg = sources[kind]
    source, table = source_lookup(cfg)
    local = global_batch // process_count
    if source.indexable:
        expected_batches = math.ceil(NUM_TRAIN / global_batch)
    else:
        expected_batches = math.ceil(math.ceil(NUM_TRAIN / process_count) / local)
    seen, per_host = [], []
    for p in range(process_count):
        ds = pipeline.build_eval_dataset(
            cfg,
            aug_config(identity=True),
            split="train",
            global_batch_size=global_batch,
            process_index=p,
            process_count=process_count,
        )
        batches = list(ds.as_numpy_iterator())
        assert len(batches) == ds.cardinality().numpy() == expected_batches
        images = np.concatenate([b["image"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        mask = np.concatenate([b["mask"] for b in batches])
        assert images.shape == (expected_batches * local, SIZE, SIZE, 3)
        assert labels.dtype == np.int32 and mask.dtype == bool
        expected = expected_eval_indices(source, p, process_count, global_batch)
        np.testing.assert_array_equal(mask, np.arange(len(mask)) < len(expected))
        assert not images[~mask].any() and not labels[~mask].any()
        ids = identify(images[mask], table)
        assert [index for index, _ in ids] == expected
        assert [label for _, label in ids] == list(labels[mask])
        seen += expected
        per_host.append((images, mask))
    assert sorted(seen) == list(range(NUM_TRAIN))
    if source.indexable:  # Laid out by process, the global batches are the split in order.
        order = []
        for s in range(expected_batches):
            for images, mask in per_host:
                rows = slice(s * local, (s + 1) * local)
                order += [i for i, _ in identify(images[rows][mask[rows]], table)]
        assert order == list(range(NUM_TRAIN))


@pytest.mark.parametrize("kind", ["folder-uncached", "tfds-cached", "tfds-stream"])
def test_finetune_uses_only_the_subset(sources, kind):
    cfg = sources[kind]
    source, table = source_lookup(cfg)
    subset = np.array([1, 2, 4, 8, 9, 13, 14, 17, 20, 22])
    drawn_by_host = []
    for p in range(2):
        ds, info = pipeline.build_finetune_dataset(
            cfg,
            aug_config(identity=True),
            global_batch_size=4,
            seed=0,
            process_index=p,
            process_count=2,
            subset_indices=subset,
        )
        assert info.num_examples == len(subset)
        drawn = []
        for b in take(ds, info.steps_per_epoch):  # One epoch.
            assert b.keys() == {"image", "label", "index"}
            assert b["image"].shape == (2, SIZE, SIZE, 3)
            ids = identify(b["image"], table)
            assert [label for _, label in ids] == list(b["label"])
            assert [index for index, _ in ids] == list(b["index"])  # Split positions.
            drawn += [index for index, _ in ids]
        allowed = (
            set(subset) if info.global_order else set(subset) & set(source.shard_indices(p, 2))
        )
        assert set(drawn) <= allowed and len(set(drawn)) == len(drawn)
        drawn_by_host.append(drawn)
    assert not set(drawn_by_host[0]) & set(drawn_by_host[1])
    if info.global_order:  # One global permutation of the subset: 10 // 4 steps of 4.
        assert info.steps_per_epoch == len(subset) // 4


def test_errors(sources):
    cfg, aug = sources["folder-cached"], aug_config()
    with pytest.raises(ValueError, match=r"global_batch_size=10.*process_count=4"):
        pipeline.build_pretrain_dataset(cfg, aug, global_batch_size=10, seed=0, process_count=4)
    with pytest.raises(ValueError, match=r"global_batch_size=64.*holds only 23"):
        pipeline.build_pretrain_dataset(cfg, aug, global_batch_size=64, seed=0)
    with pytest.raises(ValueError, match=r"process_index=2"):
        pipeline.build_eval_dataset(
            cfg, aug, split="train", global_batch_size=4, process_index=2, process_count=2
        )
    with pytest.raises(ValueError, match=r"start_step=-1"):
        pipeline.build_pretrain_dataset(cfg, aug, global_batch_size=4, seed=0, start_step=-1)
    with pytest.raises(
        ValueError, match=r"batch_rows=\[0, 0\].*2 distinct ints in \[0, global_batch_size=4\)"
    ):
        pipeline.build_pretrain_dataset(
            cfg, aug, global_batch_size=4, seed=0, process_count=2, batch_rows=[0, 0]
        )
    with pytest.raises(ValueError, match=r"batch_rows"):
        pipeline.build_pretrain_dataset(
            cfg, aug, global_batch_size=4, seed=0, process_count=2, batch_rows=[0, 1, 2]
        )
    with pytest.raises(ValueError, match=r"subset_indices range"):
        pipeline.build_finetune_dataset(
            cfg, aug, global_batch_size=2, seed=0, subset_indices=[0, NUM_TRAIN]
        )


@pytest.mark.slow
def test_configure_tensorflow_limits_threads_before_init():
    # A fresh process: the settings only take effect before TF initialises.
    code = (
        "from simclr_jax.data import pipeline; import tensorflow as tf; "
        "pipeline.configure_tensorflow(intra_op_threads=1, inter_op_threads=2); "
        "tf.constant(1.0) + 1.0; "
        "print(tf.config.threading.get_intra_op_parallelism_threads(), "
        "tf.config.threading.get_inter_op_parallelism_threads(), "
        "len(tf.config.get_visible_devices('GPU')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "2", "0"]
    pipeline.configure_tensorflow()  # TF is initialised in this process: it must only log.


def test_cache_does_not_change_the_stream(tmp_path):
    """Cached (flat buffer for mixed sizes) and uncached reads give identical batches."""
    rng = np.random.default_rng(0)
    for i in range(10):
        path = tmp_path / f"c{i % 2}" / f"{i}.png"
        os.makedirs(path.parent, exist_ok=True)
        shape = (8 + i, 13 - i % 4, 3)
        Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(path)
    streams = []
    for cache in (True, False):
        cfg = data_config(source="folder", name=str(tmp_path), cache=cache)
        ds, info = pipeline.build_pretrain_dataset(cfg, aug_config(), global_batch_size=4, seed=5)
        assert info.cached == cache
        streams.append(take(ds, 3))
    assert_batches_equal(*streams)


def test_filter_subset_keeps_members_when_later_records_follow():
    """Records past the subset's largest index are dropped, not an out-of-range gather
    (a tfds fine-tuning subset whose last member comes before the split's end)."""
    records = tf.data.Dataset.from_tensor_slices({"index": np.arange(10, dtype=np.int64)})
    kept = order.filter_subset(records, np.array([1, 4, 5]))
    assert [int(r["index"]) for r in kept.as_numpy_iterator()] == [1, 4, 5]
