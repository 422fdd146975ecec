"""Input data for SimCLR.

sources/: the data sources (embedded sample, tfds, image folders and archives);
order.py: which example fills which batch row each step, and the data seeds;
pipeline.py: the tf.data pipelines; augment.py: the augmentation ops (color.py:
the colour ops, op_inputs.py: their seed and image inputs, checks.py: their
argument checks); views.py: the views composed from them, each view with its
own recipe, and the augment config; preview.py: a PNG of augmented views.
"""
