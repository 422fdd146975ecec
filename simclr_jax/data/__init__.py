"""Input data: sources (datasets), augmentations (augment), tf.data pipelines (pipeline)."""
