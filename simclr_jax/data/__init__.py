"""Input data: sources (sources/), augmentations (augment), tf.data pipelines (pipeline)."""
