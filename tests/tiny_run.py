"""The tiny pretraining run that tests share: its config, and the run itself (conftest.py).

One run per pytest process (session-scoped: with `-n 2` each xdist worker that
needs it makes its own; 4 steps of ResNet-18 at base width 4 on the embedded
sample, 8 devices, shard_map) serves every test that needs a pretraining
checkpoint; tests read it and never write into its workdir.
"""

from configs import cifar10


def tiny_config(**overrides):
    """The runlocal config shrunk: ResNet-18 at base width 4, batch 16, 4 steps, no kNN.

    Args:
      **overrides: 'section__field' -> value, e.g. train__num_devices=1.
    """
    config = cifar10.get_config("runlocal")
    config.model.base_width = 4
    config.model.head_hidden_dim = 16
    config.model.head_dim = 16
    config.train.batch_size = 16
    config.train.steps = 4
    config.train.log_every_steps = 2
    config.checkpoint.every_steps = 2
    config.checkpoint.asynchronous = False
    config.eval.knn = False
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config
