"""Input data for SimCLR.

sources/: the data sources (embedded sample, tfds, image folders and archives);
order.py: which example fills which batch row each step, and the data seeds;
pipeline.py: the tf.data pipelines; augment.py: the augmentation ops (checks.py:
their argument checks); views.py: the views composed from them and the augment
config; preview.py: a PNG of augmented views.
"""
