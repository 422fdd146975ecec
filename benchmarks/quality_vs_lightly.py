r"""Pretraining quality side by side: our SimCLR (main.py) and lightly's, same data and budget.

  python benchmarks/quality_vs_lightly.py --data=PATH/cifar10-jpeg/train.tar.gz \
      --lightly_python=LIGHTLY_VENV/bin/python --seeds=0,1,2 --workdir=workdirs/vs_lightly

Both sides pretrain on the first --train_per_class images (sorted file names) of every class
of --data (a .tar/.tar.gz or a folder of <class>/<image>, possibly under a top folder) and are
evaluated on the last --eval_per_class of each; the subset is written once to
<workdir>/data/{train,test}/<class>/ and both sides read that folder. Per side and seed:
kNN top-1 (k 200, T 0.1, cosine on the encoder output h, memory = the pretraining images),
the online linear probe's top-1 on the evaluation images, the run's wall time (process start
to results, evaluation included) and the training images/s (one image = two views). Then the
mean, sample standard deviation and range over the seeds, and --json.

The setting (SimCLR): ResNet-18 with the CIFAR stem at base width --width (16), batch
--batch (256), --epochs (5), LARS with base LR 1.0 x B/256, weight decay 1e-4 without BN
parameters and biases, warmup 0.5 epoch then cosine, NT-Xent with tau 0.5 at the reference's
loss scale 2, a 3-layer BN projection head to 128, colour jitter strength 0.5, no blur, no
input normalisation. Ours: main.py with configs/cifar10.py and overrides. Lightly's:
SimCLRTransform, SimCLRProjectionHead, NTXentLoss, LARS and OnlineLinearClassifier from
lightly, a torchvision-layout ResNet-18, a plain PyTorch loop. What each lightly component
corresponds to on ours, and where they differ: docs/quality_vs_lightly.md.

Other methods (--method=byol, mocov2, barlow_twins, vicreg, nnclr): our CIFAR recipe of that
method (configs/<method>_cifar10.py) with the same budget overrides, against its lightly
counterpart (benchmarks/lightly_methods.py).

One script, three roles: the driver (default) runs our side with --ours_python (default: this
interpreter), resolves our config with the same overrides into <workdir>/recipe.json
(--role=recipe under --ours_python), and runs the lightly side by calling this script with
--role=lightly under --lightly_python, which needs torch, torchvision and lightly (an
optional extra, never a dependency of the library) and reads every value it configures from
the recipe. Each run writes one JSON file; a rerun with the same setting reuses the finished
ones, so a long comparison can be resumed.
"""

import argparse
import dataclasses
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = ("ours", "lightly")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LIGHTLY_MODULES = ("torch", "torchvision", "lightly")
INSTALL_HINT = (
    "install them apart from the project, e.g. python3.11 -m venv VENV && VENV/bin/pip install "
    "torch==2.14.1 torchvision==0.29.1 lightly, then pass --lightly_python=VENV/bin/python"
)
# The recipe's fixed part (both sides); --width, --batch and --epochs vary.
BASE_LR = 1.0  # x batch / 256
WEIGHT_DECAY = 1e-4
MOMENTUM = 0.9
TRUST_COEFFICIENT = 0.001
WARMUP_EPOCHS = 0.5
TEMPERATURE = 0.5
LOSS_SCALE = 2.0
HEAD_LAYERS = 3
HEAD_DIM = 128
JITTER_STRENGTH = 0.5
KNN_K = 200
KNN_TEMPERATURE = 0.1
EVAL_BATCH = 512


class HarnessError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Method:
    """One method: our config, its overrides, and the builder of its lightly counterpart."""

    our_config: str
    our_overrides: tuple[str, ...] = ()
    # The builder of its lightly counterpart: a function of benchmarks/lightly_methods.py.
    lightly_counterpart: str = ""


# The SimCLR setting; the other methods run their own CIFAR recipe (configs/) with the
# harness's budget (recipe_overrides), so a method's side-by-side is the recipe users run.
SIMCLR_OVERRIDES = (
    f"--config.model.head_layers={HEAD_LAYERS}",
    f"--config.model.head_dim={HEAD_DIM}",
    "--config.optim.name=lars",
    f"--config.optim.base_lr={BASE_LR}",
    "--config.optim.lr_scaling=linear",
    f"--config.optim.weight_decay={WEIGHT_DECAY}",
    f"--config.optim.momentum={MOMENTUM}",
    f"--config.optim.trust_coefficient={TRUST_COEFFICIENT}",
    f"--config.loss.temperature={TEMPERATURE}",
    f"--config.loss.loss_scale={LOSS_SCALE}",
    f"--config.augment.jitter_strength={JITTER_STRENGTH}",
    "--config.augment.blur_prob=0.0",
)
METHODS = {
    "simclr": Method("configs/cifar10.py", SIMCLR_OVERRIDES, "simclr"),
    "byol": Method("configs/byol_cifar10.py", (), "byol"),
    "mocov2": Method("configs/mocov2_cifar10.py", (), "mocov2"),
    "barlow_twins": Method("configs/barlow_twins_cifar10.py", (), "barlow_twins"),
    "vicreg": Method("configs/vicreg_cifar10.py", (), "vicreg"),
    "nnclr": Method("configs/nnclr_cifar10.py", (), "nnclr"),
}
# Methods of ours without a lightly counterpart, and why (printed when asked for).
NO_COUNTERPART = {
    "mocov3": "lightly has MoCo v3's heads but not its loss (2 tau CE(q k^T / tau) over the "
    "keys of the batch)",
    "instdisc": "lightly has no InstDisc (a memory bank of one vector per image, the "
    "non-parametric softmax)",
}


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """Our config's overrides for the harness's setting: budget, encoder, kNN, the method's.

    Every method gets the setting's width, batch and epochs and the 0.5-epoch warmup (the
    CIFAR recipes' 10 warmup epochs are for 1000-epoch runs); the rest is its config's.
    """
    return [
        f"--config.model.base_width={args.width}",
        "--config.model.cifar_stem=True",
        f"--config.train.batch_size={args.batch}",
        f"--config.train.epochs={args.epochs}",
        f"--config.optim.warmup_epochs={WARMUP_EPOCHS}",
        f"--config.eval.knn_k={KNN_K}",
        f"--config.eval.knn_temperature={KNN_TEMPERATURE}",
        "--config.eval.compare_random_init=False",
        *METHODS[args.method].our_overrides,
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="simclr", help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--sides", default="ours,lightly", help="ours, lightly or both")
    parser.add_argument("--data", default="", help="archive or folder of <class>/<image>")
    parser.add_argument("--workdir", default="workdirs/quality_vs_lightly")
    parser.add_argument("--train_per_class", type=int, default=4000)
    parser.add_argument("--eval_per_class", type=int, default=1000)
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 base width")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--ours_python", default=sys.executable)
    parser.add_argument("--lightly_python", default=sys.executable)
    parser.add_argument(
        "--lightly_views",
        default="separate",
        choices=["separate", "joint"],
        help="lightly side: one forward pass per view (lightly's examples; BN statistics per "
        "view) or both views in one pass (ours and the reference; BN over both)",
    )
    parser.add_argument("--lightly_workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--lightly_device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--json", default="", help="also write the summary here")
    # The roles the driver runs: recipe (under --ours_python) and lightly (--lightly_python).
    parser.add_argument("--role", default="driver", choices=["driver", "recipe", "lightly"])
    parser.add_argument("--seed", type=int, default=0, help="--role=lightly only")
    parser.add_argument("--data_root", default="", help="--role=lightly: the prepared subset")
    parser.add_argument("--recipe", default="", help="--role=lightly: the resolved recipe JSON")
    parser.add_argument("--out", default="", help="--role=recipe|lightly: the JSON written")
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except HarnessError as e:
        parser.error(str(e))
    return args


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; distinct non-negative integers, at least one."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise HarnessError(
            f"--seeds={text!r}: expected comma-separated non-negative integers, e.g. 0,1,2"
        ) from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise HarnessError(f"--seeds={text!r}: seeds must be distinct and non-negative")
    return seeds


def check_args(args: argparse.Namespace) -> None:
    """Checks the arguments that need no files; raises HarnessError naming the flag."""
    if args.method not in METHODS:
        why = NO_COUNTERPART.get(args.method, "unknown method")
        raise HarnessError(
            f"--method={args.method!r} has no lightly counterpart ({why}); available: "
            f"{', '.join(METHODS)}"
        )
    args.seed_list = parse_seeds(args.seeds)
    args.side_list = [s for s in args.sides.split(",") if s]
    if not args.side_list or any(s not in SIDES for s in args.side_list):
        raise HarnessError(f"--sides={args.sides!r}: expected ours, lightly or ours,lightly")
    for name in ("width", "batch", "train_per_class", "eval_per_class"):
        if getattr(args, name) <= 0:
            raise HarnessError(f"--{name}={getattr(args, name)} must be a positive integer")
    if not math.isfinite(args.epochs) or args.epochs < WARMUP_EPOCHS:
        raise HarnessError(f"--epochs={args.epochs} must be at least the warmup, {WARMUP_EPOCHS}")
    if args.role == "lightly" and not (args.data_root and args.recipe and args.out):
        raise HarnessError(
            "--role=lightly needs --data_root, --recipe and --out (the driver passes them)"
        )
    if args.role == "recipe" and not args.out:
        raise HarnessError("--role=recipe needs --out (the driver passes it)")
    if args.lightly_workers < 0:
        raise HarnessError(f"--lightly_workers={args.lightly_workers} must be >= 0")


def check_lightly_python(python: str, modules: tuple[str, ...] = LIGHTLY_MODULES) -> None:
    """Raises HarnessError (one line, with the install command) unless `python` imports modules."""
    if not os.path.isfile(python):
        raise HarnessError(f"--lightly_python={python!r}: no such interpreter; {INSTALL_HINT}")
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    done = subprocess.run(
        [python, "-c", code, *modules], capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise HarnessError(
            f"the lightly side needs {', '.join(modules)} in --lightly_python={python} ({last}); "
            f"{INSTALL_HINT}"
        )


def schedule(
    num_train: int, args: argparse.Namespace, warmup_epochs: float = WARMUP_EPOCHS
) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warmup steps), as simclr_jax.train derives them."""
    steps_per_epoch = num_train // args.batch
    if steps_per_epoch == 0:
        raise HarnessError(f"--batch={args.batch} exceeds the {num_train} pretraining images")
    total = int(math.ceil(args.epochs * steps_per_epoch))
    return steps_per_epoch, total, int(round(warmup_epochs * steps_per_epoch))


# --- the data subset -----------------------------------------------------------------------


def _list_images(data: str) -> dict[str, list[str]]:
    """{class: sorted member names or paths} of an archive or folder (class = parent folder)."""
    if os.path.isdir(data):
        names = [
            os.path.relpath(os.path.join(top, f), data)
            for top, _, files in os.walk(data)
            for f in files
        ]
    else:
        with tarfile.open(data) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
    by_class: dict[str, list[str]] = {}
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if len(parts) >= 2 and name.lower().endswith(IMAGE_EXTENSIONS):
            by_class.setdefault(parts[-2], []).append(name)
    for cls, members in by_class.items():
        if len({os.path.dirname(m) for m in members}) > 1:
            raise HarnessError(f"--data={data!r}: class {cls!r} appears in several folders")
        members.sort(key=os.path.basename)
    return by_class


def prepare_subset(args: argparse.Namespace) -> str:
    """Writes <workdir>/data/{train,test}/<class>/ once; returns that folder."""
    root = os.path.join(args.workdir, "data")
    manifest = {
        "data": os.path.abspath(args.data),
        "train_per_class": args.train_per_class,
        "eval_per_class": args.eval_per_class,
    }
    marker = os.path.join(root, "subset.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == manifest:
                return root
        raise HarnessError(f"{root} holds another subset; use another --workdir or remove it")
    if not args.data or not os.path.exists(args.data):
        raise HarnessError(
            f"--data={args.data!r}: no such archive or folder; expected a .tar/.tar.gz or a "
            "folder of <class>/<image> (e.g. CIFAR-10's training images as JPEG)"
        )
    by_class = _list_images(args.data)
    need = args.train_per_class + args.eval_per_class
    short = {c: len(m) for c, m in by_class.items() if len(m) < need}
    if not by_class or short:
        raise HarnessError(
            f"--data={args.data!r}: every class needs --train_per_class + --eval_per_class = "
            f"{need} images; found {short or 'no class folders'}"
        )
    chosen = {}  # member -> destination
    for cls, members in by_class.items():
        for split, part in (
            ("train", members[: args.train_per_class]),
            ("test", members[-args.eval_per_class :]),
        ):
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for m in part:
                chosen[m] = os.path.join(root, split, cls, os.path.basename(m))
    if os.path.isdir(args.data):
        for member, dest in chosen.items():
            with open(os.path.join(args.data, member), "rb") as src, open(dest, "wb") as out:
                out.write(src.read())
    else:
        with tarfile.open(args.data) as tar:
            for member in tar:
                if member.name in chosen:
                    with tar.extractfile(member) as src, open(chosen[member.name], "wb") as out:
                        out.write(src.read())
    with open(marker, "w") as f:
        json.dump(manifest, f)
    return root


# --- our side ------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace, data_root: str, seed: int) -> dict:
    """main.py on the subset; returns its results.json fields the summary needs."""
    method = METHODS[args.method]
    workdir = os.path.abspath(os.path.join(args.workdir, "ours", f"seed{seed}"))
    command = [
        args.ours_python,
        os.path.join(ROOT, "main.py"),
        f"--config={os.path.join(ROOT, method.our_config)}",
        f"--workdir={workdir}",
        "--config.data.source=folder",
        f"--config.data.name={os.path.abspath(data_root)}",
        "--config.data.train_split=train",
        "--config.data.eval_split=test",
        "--config.data.val_fraction=0.0",
        f"--config.seed={seed}",
        *recipe_overrides(args),
    ]
    wall = _run_logged(command, os.path.join(workdir + ".log"), _ours_env())
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    return {
        "knn_top1": results["knn_top1"],
        "probe_top1": results["probe_top1"],
        "images_per_sec": results["images_per_sec"],
        "wall_s": wall,
        "steps": results["step"],
    }


def _ours_env() -> dict:
    """The environment of our side's processes: this repository first on PYTHONPATH."""
    path = os.pathsep.join(filter(None, [ROOT, os.getenv("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


def write_recipe(args: argparse.Namespace) -> dict:
    """--role=recipe (under --ours_python): our config with recipe_overrides, resolved.

    Loads the method's config file with the same overrides as main.py would (ml_collections'
    config flags), adds each view's resolved augmentations (simclr_jax.data.views.view_recipe)
    under 'views', writes it to --out as JSON and returns it. The lightly side reads every
    value it configures from this file.
    """
    from absl import flags
    from ml_collections import config_flags

    from simclr_jax.data import views

    path = os.path.join(ROOT, METHODS[args.method].our_config)
    argv = ["recipe", f"--config={path}", *recipe_overrides(args)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    config = values.config
    name = config.get("method", {}).get("name", "simclr")
    if name != args.method:
        raise HarnessError(f"{path} configures the method {name!r}, not {args.method!r}")
    recipe = json.loads(config.to_json_best_effort())
    recipe["views"] = [views.view_recipe(config.augment, view) for view in (1, 2)]
    with open(args.out, "w") as f:
        json.dump(recipe, f, indent=2)
    return recipe


def resolve_recipe(args: argparse.Namespace) -> str:
    """Runs --role=recipe under --ours_python once; returns <workdir>/recipe.json."""
    out = os.path.abspath(os.path.join(args.workdir, "recipe.json"))
    command = [
        args.ours_python,
        os.path.abspath(__file__),
        "--role=recipe",
        f"--method={args.method}",
        f"--width={args.width}",
        f"--batch={args.batch}",
        f"--epochs={args.epochs}",
        f"--out={out}",
    ]
    env = dict(_ours_env(), TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise HarnessError(f"resolving our {args.method} recipe failed: {last}")
    return out


def _run_logged(command: list[str], log_path: str, env: dict | None = None) -> float:
    """Runs command, its output to the console and log_path; returns its wall time (s)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
        )
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = process.wait()
    if code != 0:
        raise HarnessError(f"run failed with status {code}: see {log_path}")
    return time.perf_counter() - start


# --- lightly's side (benchmarks/lightly_side.py and lightly_methods.py import torch) --------


def run_lightly(args: argparse.Namespace, data_root: str, seed: int) -> dict:
    """This script with --role=lightly under --lightly_python; returns its JSON."""
    recipe = resolve_recipe(args)
    out = os.path.abspath(os.path.join(args.workdir, "lightly", f"seed{seed}.json"))
    command = [
        args.lightly_python,
        os.path.abspath(__file__),
        "--role=lightly",
        f"--method={args.method}",
        f"--seed={seed}",
        f"--data_root={os.path.abspath(data_root)}",
        f"--recipe={recipe}",
        f"--out={out}",
        f"--width={args.width}",
        f"--batch={args.batch}",
        f"--epochs={args.epochs}",
        f"--lightly_views={args.lightly_views}",
        f"--lightly_workers={args.lightly_workers}",
        f"--lightly_device={args.lightly_device}",
    ]
    wall = _run_logged(command, out[: -len(".json")] + ".log")
    with open(out) as f:
        result = json.load(f)
    result["wall_s"] = wall
    return result


# --- the driver ----------------------------------------------------------------------------


def summarise(per_seed: dict[int, dict]) -> dict:
    """Mean, sample standard deviation (0 for one seed), min and max of each metric."""
    summary = {}
    for key in ("knn_top1", "probe_top1", "wall_s", "images_per_sec"):
        values = [r[key] for r in per_seed.values()]
        summary[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    return summary


def _setting(args: argparse.Namespace) -> dict:
    keys = ("method", "data", "train_per_class", "eval_per_class", "width", "batch", "epochs")
    return {k: getattr(args, k) for k in keys} | {"lightly_views": args.lightly_views}


def drive(args: argparse.Namespace) -> dict:
    if "lightly" in args.side_list:
        check_lightly_python(args.lightly_python)
    data_root = prepare_subset(args)
    setting_path = os.path.join(args.workdir, "setting.json")
    if os.path.exists(setting_path):
        with open(setting_path) as f:
            if json.load(f) != _setting(args):
                raise HarnessError(
                    f"{args.workdir} holds a comparison with another setting ({setting_path}); "
                    "use another --workdir"
                )
    with open(setting_path, "w") as f:
        json.dump(_setting(args), f, indent=2)
    runners = {"ours": run_ours, "lightly": run_lightly}
    report = {"setting": _setting(args), "sides": {}}
    per_side = {side: {} for side in args.side_list}
    # Seed by seed, the sides alternating: a drift of the machine's speed hits both alike.
    for seed in args.seed_list:
        for side in args.side_list:
            done = os.path.join(args.workdir, f"{side}_seed{seed}.json")
            if os.path.exists(done):
                with open(done) as f:
                    per_side[side][seed] = json.load(f)
                print(f"{side} seed {seed}: reusing {done}")
                continue
            per_side[side][seed] = runners[side](args, data_root, seed)
            with open(done, "w") as f:
                json.dump(per_side[side][seed], f, indent=2)
    for side, per_seed in per_side.items():
        report["sides"][side] = {"seeds": per_seed, "summary": summarise(per_seed)}
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def format_report(report: dict) -> str:
    setting = report["setting"]
    lines = [
        f"{setting['method']}: ResNet-18 width {setting['width']}, batch {setting['batch']}, "
        f"{setting['epochs']} epochs, {setting['train_per_class']}/{setting['eval_per_class']} "
        "images per class (train/eval)",
        f"{'side':8s} {'kNN top-1 mean ± std [min, max]':34s} {'probe top-1':12s} "
        f"{'wall s':>8s} {'train img/s':>12s}  per seed kNN",
    ]
    for side, data in report["sides"].items():
        s = data["summary"]
        knn = s["knn_top1"]
        seeds = " ".join(f"{k}:{100 * v['knn_top1']:.2f}" for k, v in data["seeds"].items())
        lines.append(
            f"{side:8s} {100 * knn['mean']:6.2f} ± {100 * knn['std']:4.2f} "
            f"[{100 * knn['min']:.2f}, {100 * knn['max']:.2f}]{'':8s} "
            f"{100 * s['probe_top1']['mean']:6.2f}{'':6s} {s['wall_s']['mean']:8.1f} "
            f"{s['images_per_sec']['mean']:12.1f}  {seeds}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    args = parse_args(argv)
    try:
        if args.role == "recipe":
            return write_recipe(args)
        if args.role == "lightly":
            # lightly_side imports this script by name: one module, one HarnessError class.
            sys.modules.setdefault("quality_vs_lightly", sys.modules[__name__])
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            lightly_side = importlib.import_module("lightly_side")
            methods = importlib.import_module("lightly_methods")
            with open(args.recipe) as f:
                recipe = json.load(f)
            build = getattr(methods, METHODS[args.method].lightly_counterpart)
            result = lightly_side.run(args, args.data_root, args.seed, recipe, build)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
            return result
        return drive(args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
