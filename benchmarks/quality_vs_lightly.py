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

One script, three roles: the driver (default) resolves our config with the setting's
overrides into <workdir>/recipe.json once (--role=recipe under --ours_python, default: this
interpreter, which therefore needs our package even for --sides=lightly), runs our side with
--ours_python, and runs the lightly side by calling this script with --role=lightly under
--lightly_python, which needs torch, torchvision and lightly (an optional extra, never a
dependency of the library) and reads every value it configures from the recipe. Each run
writes one JSON file; a rerun with the same setting (the recipe's hash included) reuses the
finished ones, so a long comparison can be resumed. The setting's constants, the method
table and the recipe: benchmarks/quality_recipe.py.
"""

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import time

from quality_recipe import (
    INSTALL_HINT,
    METHODS,
    NO_COUNTERPART,
    ROOT,
    WARMUP_EPOCHS,
    HarnessError,
    check_lightly_recipe,
    recipe_overrides,
    write_recipe,
)

SIDES = ("ours", "lightly")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LIGHTLY_MODULES = ("torch", "torchvision", "lightly")


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
    parser.add_argument(
        "--ours_python",
        default=sys.executable,
        help="an interpreter with our package: runs our side and resolves the recipe (so it is "
        "needed for --sides=lightly too)",
    )
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


def _role_command(python: str, role: str, args: argparse.Namespace, out: str) -> list[str]:
    """This script under `python` in `role`, with the setting's flags, writing `out`."""
    return [
        python,
        os.path.abspath(__file__),
        f"--role={role}",
        f"--method={args.method}",
        f"--width={args.width}",
        f"--batch={args.batch}",
        f"--epochs={args.epochs}",
        f"--out={out}",
    ]


def resolve_recipe(args: argparse.Namespace, out: str) -> str:
    """Runs --role=recipe under --ours_python, writing `out`; returns the file's SHA-256."""
    command = _role_command(args.ours_python, "recipe", args, out)
    env = dict(_ours_env(), TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise HarnessError(
            f"resolving our {args.method} recipe failed: {last.removeprefix('error: ')}"
        )
    with open(out, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _run_logged(command: list[str], log_path: str, env: dict | None = None) -> float:
    """Runs command, its output to the console and log_path; returns its wall time (s)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w", buffering=1) as log:  # line-buffered: `tail -f` follows it
        log.write(" ".join(command) + "\n")
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
        )
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()  # also when the driver's output goes to a file
            log.write(line)
        code = process.wait()
    if code != 0:
        raise HarnessError(f"run failed with status {code}: see {log_path}")
    return time.perf_counter() - start


# --- lightly's side (benchmarks/lightly_side.py and lightly_methods.py import torch) --------


def run_lightly(args: argparse.Namespace, data_root: str, seed: int, recipe: str) -> dict:
    """This script with --role=lightly under --lightly_python; returns its JSON."""
    out = os.path.abspath(os.path.join(args.workdir, "lightly", f"seed{seed}.json"))
    command = [
        *_role_command(args.lightly_python, "lightly", args, out),
        f"--seed={seed}",
        f"--data_root={os.path.abspath(data_root)}",
        f"--recipe={recipe}",
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


def _setting(args: argparse.Namespace, recipe_sha256: str) -> dict:
    """What a finished run's JSON depends on; a resumed comparison must match it."""
    keys = ("method", "data", "train_per_class", "eval_per_class", "width", "batch", "epochs")
    return {k: getattr(args, k) for k in keys} | {
        "lightly_views": args.lightly_views,
        "recipe_sha256": recipe_sha256,  # our config file and its overrides, resolved
    }


def _check_setting(path: str, setting: dict) -> None:
    """Raises HarnessError naming the fields where the workdir's earlier setting differs.

    recipe_sha256 covers our config resolved with the setting's overrides (our config files,
    the overrides, the views' augmentations), not the lightly side's code or the packages'
    versions (each lightly JSON records those).
    """
    if not os.path.exists(path):
        return
    with open(path) as f:
        earlier = json.load(f)
    if "recipe_sha256" not in earlier:
        raise HarnessError(
            f"{path} predates the recipe's hash (an older harness): if our config files have not "
            "changed since its runs, delete it to carry on with them; otherwise use another "
            "--workdir"
        )
    differ = sorted(k for k in setting.keys() | earlier.keys() if setting.get(k) != earlier.get(k))
    if differ:
        raise HarnessError(
            f"{os.path.dirname(path)} holds a comparison with another setting ({path}: "
            f"{', '.join(differ)} differ; recipe_sha256 changes with our config files and their "
            "resolution); use another --workdir"
        )


def drive(args: argparse.Namespace) -> dict:
    if "lightly" in args.side_list:
        check_lightly_python(args.lightly_python)
    data_root = prepare_subset(args)
    # Resolved aside, and kept only once the setting is the workdir's: a refused setting
    # leaves the recipe of the runs already there.
    recipe = os.path.abspath(os.path.join(args.workdir, "recipe.json"))
    pending = recipe + ".pending"
    setting_path = os.path.join(args.workdir, "setting.json")
    try:
        setting = _setting(args, resolve_recipe(args, pending))
        if "lightly" in args.side_list:
            with open(pending) as f:
                check_lightly_recipe(json.load(f))  # before our side's first run, not after
        _check_setting(setting_path, setting)
    except HarnessError:
        if os.path.exists(pending):
            os.remove(pending)
        raise
    os.replace(pending, recipe)
    with open(setting_path, "w") as f:
        json.dump(setting, f, indent=2)
    runners = {
        "ours": lambda seed: run_ours(args, data_root, seed),
        "lightly": lambda seed: run_lightly(args, data_root, seed, recipe),
    }
    report = {"setting": setting, "sides": {}}
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
            per_side[side][seed] = runners[side](seed)
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
            # Imported here: they import torch, which the driver never does.
            import lightly_methods
            import lightly_side

            with open(args.recipe) as f:
                recipe = json.load(f)
            build = getattr(lightly_methods, METHODS[args.method].lightly_counterpart)
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
