r"""Writes the representations h of a dataset split and a 2-D map picture of them.

  python -m simclr_jax.embed --init_from=workdirs/quickstart --out=workdirs/quickstart_embed
  python -m simclr_jax.embed --init_from=workdirs/r18/checkpoints/20000 --out=emb \
      --split=test --method=umap --max_examples=10000 \
      --config.data.source=tfds --config.data.name=cifar10 --config.data.data_dir=DIR

The data is the pretraining run's (its config.json's data and augment sections, read
next to the checkpoint); `--config.<section>.<field>=value` overrides any field of
data, augment or eval (eval.batch_size, eval.num_devices). --split defaults to the
run's data.eval_split. The files (embeddings.npy, labels.npy, indices.npy, map.png,
...) are listed in simclr_jax/eval/embeddings.py. The map holds at most
--max_examples points (default 5,000: t-SNE of 5,000 points takes about a minute on 2
CPU cores); embeddings.npy always holds the whole split. One process; its local
devices share the batches. A user error (missing init_from, unknown split or method,
mistyped field) prints one `error: ...` line and exits with status 2 (simclr_jax/cli.py).
"""

import os

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from simclr_jax import cli  # imports neither jax nor TensorFlow


def _define_flags() -> None:
    # Defined only when run as a program, not at import, like the other command-line modules
    # (simclr_jax.export and simclr_jax.convert have an --out of their own).
    flags.DEFINE_string(
        "init_from", None, "Pretraining workdir (its latest checkpoint) or checkpoints/<step> dir."
    )
    flags.DEFINE_string("out", None, "Output directory (local or gs://).")
    flags.DEFINE_string("split", "", "Split spec to embed; '' = the run's data.eval_split.")
    flags.DEFINE_string("method", "tsne", "2-D map: 'tsne' (scikit-learn) or 'umap'.")
    flags.DEFINE_integer("max_examples", 5000, "Most points on the map (a seeded subset; 0: all).")
    flags.DEFINE_integer("seed", 0, "Seed of the map's subset and of t-SNE/UMAP.")
    # Overrides of the run's config, field by field; the sections are filled from config.json,
    # so the flag accepts any field name and embeddings.embed_config checks it against the run.
    config_flags.DEFINE_config_dict(
        "config",
        config_dict.ConfigDict({"data": {}, "augment": {}, "eval": {}}),
        "Overrides of the pretraining run's config: --config.data.name=cifar10, ...",
        lock_config=False,
        accept_new_attributes=True,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # as main.py: orbax logs every restore at INFO
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # scikit-learn's t-SNE runs OpenMP threads that busy-wait at each of its many barriers; on
    # shared cores that made t-SNE of 1,000 points 5x slower (90 s, against 18 s passive).
    # libgomp reads this when it loads, so it is set before scikit-learn is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli.import_tensorflow_quietly()  # before anything else imports TensorFlow
    from simclr_jax.config_checks import ConfigError
    from simclr_jax.eval import embedding_map, embeddings

    f = flags.FLAGS
    if not f.out:
        raise ConfigError("--out is empty: name the output directory, e.g. --out=embeddings")
    embedding_map.check_method(f.method)
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    config = embeddings.embed_config(f.init_from or "", overrides)
    split = f.split or config.data.eval_split
    embeddings.write_embeddings(
        f.out,
        config,
        split,
        method=f.method,
        max_examples=f.max_examples,
        seed=f.seed,
    )
    print(f"wrote embeddings.npy, labels.npy, indices.npy and map.png to {f.out}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
