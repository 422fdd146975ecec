r"""The reference SimCLR CIFAR-10 recipe: ResNet-18 (CIFAR stem), batch 512, 1000 epochs.

  python main.py --config=configs/cifar10.py --workdir=workdirs/cifar10

Data: tfds 'cifar10' (prepared beforehand, or add --config.data.download=True
on a machine with network). The recipe of the paper's appendix B.9 and the
reference code: LARS, base LR 1.0 with linear scaling (peak 2.0 at batch 512),
weight decay 1e-4, temperature 0.5, colour jitter strength 0.5, no blur,
10 warmup epochs then cosine decay, a 3-layer projection head, global BN.
Expected: about 91% linear-eval top-1 after 1000 epochs (reference figure),
the online probe a little below.

`--config=configs/cifar10.py:runlocal` shrinks everything to a few steps on the
embedded sample (a smoke test of the whole run on a laptop).
"""

import ml_collections as mlc


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Returns the CIFAR-10 recipe; arg='runlocal' gives a tiny smoke-test run."""
    config = mlc.ConfigDict()
    config.seed = 0

    config.data = mlc.ConfigDict()
    config.data.source = "tfds"  # 'embedded' | 'tfds' | 'folder'
    config.data.name = "cifar10"
    # A typed None, so that --config.data.data_dir=DIR works from the command line
    # (config_flags cannot override a plain None field).
    config.data.data_dir = mlc.FieldReference(None, field_type=str)
    config.data.download = False
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.val_fraction = 0.0
    config.data.strict = False
    config.data.cache = True
    # Seed of a folder's class-stratified val_fraction hold-out; fixed apart from config.seed so
    # that runs with other seeds evaluate on the same held-out images.
    config.data.split_seed = 0
    # Where .tar/.tar.gz folder archives are unpacked (None: <system temp>/simclr_jax_archives).
    config.data.extract_dir = mlc.FieldReference(None, field_type=str)
    # Shuffle buffer of uncached tfds record streams (ImageNet), per host.
    config.data.shuffle_buffer = 50_000

    config.augment = mlc.ConfigDict()
    config.augment.image_size = 32
    config.augment.crop_area_range = (0.08, 1.0)
    config.augment.crop_aspect_range = (3 / 4, 4 / 3)
    config.augment.crop_max_attempts = 100
    config.augment.flip_prob = 0.5
    config.augment.jitter_strength = 0.5
    config.augment.jitter_prob = 0.8
    config.augment.brightness_mode = "multiplicative"  # v2; 'additive' is v1
    config.augment.grayscale_prob = 0.2
    config.augment.blur_prob = 0.0
    config.augment.blur_sigma_range = (0.1, 2.0)
    config.augment.eval_crop_fraction = 0.875
    # Per-op jitter magnitudes (brightness, contrast, saturation, hue); None: derived from
    # jitter_strength s as 0.8 s, 0.8 s, 0.8 s, 0.2 s (BYOL's are 0.4, 0.4, 0.2, 0.1).
    config.augment.jitter_brightness = mlc.FieldReference(None, field_type=float)
    config.augment.jitter_contrast = mlc.FieldReference(None, field_type=float)
    config.augment.jitter_saturation = mlc.FieldReference(None, field_type=float)
    config.augment.jitter_hue = mlc.FieldReference(None, field_type=float)
    # Solarisation (x -> 1 - x where x >= 0.5) probability, applied last; not in SimCLR.
    config.augment.solarize_prob = 0.0
    # Per-view recipes: the fields above describe both views; a field set here overrides them
    # for that view only, e.g. BYOL's --config.augment.view1.blur_prob=1.0
    # --config.augment.view2.blur_prob=0.1 (configs/augment_recipes.py sets the whole recipe).
    # Each section holds flip_prob, jitter_prob, jitter_strength, jitter_brightness,
    # jitter_contrast, jitter_saturation, jitter_hue, brightness_mode, grayscale_prob,
    # blur_prob and solarize_prob, all None (the shared value); crop, image size and blur
    # sigma stay shared. The views always use different seeds.
    config.augment.view1 = view_overrides()
    config.augment.view2 = view_overrides()

    config.model = mlc.ConfigDict()
    config.model.depth = 18
    config.model.width_multiplier = 1
    config.model.base_width = 64
    config.model.cifar_stem = True
    config.model.sk_ratio = 0.0
    config.model.dtype = "float32"  # 'bfloat16' computes in bf16, params stay f32
    config.model.head_layers = 3
    config.model.head_dim = 128
    config.model.head_hidden_dim = 0  # 0: as wide as the representation h
    config.model.bn_momentum = 0.9
    config.model.bn_epsilon = 1e-5
    config.model.global_bn = True

    # The self-supervised method (simclr_jax.methods owns the names): 'simclr' reads
    # config.loss; other methods read their own fields here (configs/byol_cifar10.py).
    config.method = mlc.ConfigDict()
    config.method.name = "simclr"

    config.loss = mlc.ConfigDict()
    config.loss.temperature = 0.5
    # The reference code optimises 2x the paper's NT-Xent; its LR and weight
    # decay were tuned with that scale (see simclr_jax.losses.nt_xent).
    config.loss.loss_scale = 2.0

    config.optim = mlc.ConfigDict()
    config.optim.name = "lars"
    config.optim.base_lr = 1.0
    config.optim.lr_scaling = "linear"  # peak = base_lr * batch / 256
    config.optim.weight_decay = 1e-4
    config.optim.momentum = 0.9
    config.optim.trust_coefficient = 0.001
    config.optim.nesterov = False  # name='sgd' only
    config.optim.b1 = 0.9  # name='adamw' only
    config.optim.b2 = 0.999  # name='adamw' only
    config.optim.warmup_epochs = 10.0
    # The online probe is excluded from weight decay and LARS adaptation; True
    # decays its kernel as the reference TF2 code does (an L2 term in its loss).
    config.optim.probe_weight_decay = False

    config.train = mlc.ConfigDict()
    config.train.batch_size = 512  # global, over all devices and hosts
    config.train.epochs = 1000.0
    config.train.steps = 0  # > 0 overrides epochs
    config.train.parallelism = "shard_map"  # or 'pmap'
    config.train.num_devices = 0  # 0: all
    config.train.log_every_steps = 50
    # > 0: process the batch in micro-batches of this many examples (global, over
    # all devices) with the exact full-batch NT-Xent gradient (gradient caching):
    # large batches on small hardware. Must divide batch_size and be divisible by
    # the device count. Costs one extra forward pass per step.
    config.train.micro_batch_size = 0
    # BatchNorm under micro-batching: 'micro' normalises each micro-batch with its
    # own statistics (over every device with global BN); 'frozen' uses the running
    # statistics (inference-mode BN, e.g. when continuing from a pretrained model;
    # it applies with or without micro-batching), which makes the micro-batched
    # step identical to the full-batch one.
    config.train.micro_batch_bn = "micro"
    # > 0: save and stop at this step as if preempted (split a long run into
    # jobs; rerunning the same command resumes).
    config.train.stop_at_step = 0

    config.checkpoint = mlc.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3
    config.checkpoint.asynchronous = True

    config.eval = mlc.ConfigDict()
    config.eval.knn = True
    config.eval.knn_k = 200
    config.eval.knn_temperature = 0.1
    config.eval.batch_size = 512
    # kNN monitor: also evaluate kNN and the probe every this many epochs during training
    # (logged as eval/* at that step; fractions allowed); 0: only at the end (eval.knn).
    config.eval.every_epochs = 0.0
    # Also run kNN on the randomly initialised encoder the run started from (as the protocol
    # configs' eval.compare_random_init does).
    config.eval.compare_random_init = False

    if arg == "runlocal":
        apply_runlocal(config)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; the only one is 'runlocal'")
    return config


def view_overrides() -> mlc.ConfigDict:
    """A per-view augment section with every field None (typed, so the command line can set it).

    Its fields are simclr_jax.data.views.VIEW_FIELDS (tests/views_test.py checks they agree).
    """
    fields = {
        "flip_prob": float,
        "jitter_prob": float,
        "jitter_strength": float,
        "jitter_brightness": float,
        "jitter_contrast": float,
        "jitter_saturation": float,
        "jitter_hue": float,
        "brightness_mode": str,
        "grayscale_prob": float,
        "blur_prob": float,
        "solarize_prob": float,
    }
    return mlc.ConfigDict({k: mlc.FieldReference(None, field_type=t) for k, t in fields.items()})


def apply_runlocal(config: mlc.ConfigDict) -> None:
    """Shrinks a config to a smoke test on the embedded sample (seconds, any laptop)."""
    config.data.source = "embedded"
    config.data.name = "cifar10_sample"
    config.augment.image_size = 32
    config.model.depth = 18
    config.model.base_width = 8
    config.model.cifar_stem = True
    config.train.batch_size = 32
    config.train.epochs = 0.0
    config.train.steps = 6
    config.train.log_every_steps = 2
    config.optim.warmup_epochs = 0.0
    config.checkpoint.every_steps = 3
    config.eval.batch_size = 256
