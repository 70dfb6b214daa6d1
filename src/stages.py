"""The bodies of the train/test scripts. Each top-level script names its stage and calls
``train_main`` or ``test_main``; everything else is shared here.

Stages and what each trains on:
    teacher     HR images (upscale_img_path), hard labels
    student     LR images (img_path), hard labels             (the baseline)
    kd_student  LR images, hard labels + the frozen teacher's soft targets on the HR twin
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cli import ToolError, ensure_writable_dir, pick_device, read_json, require_at_least_one, \
    run_record, save_torch, write_csv, write_json
from .data import ImageSet, load_or_create_split
from .distill import Distiller, HardLabels, LossWeights, parse_method
from .models import TESTED_ARCHS, build_model, load_checkpoint
from .plots import plot_comparison, plot_curves
from .recipes import DEFAULT_RECIPE, RECIPES, recipe_defaults, recipe_text
from .stats import paired_bootstrap
from .trainer import FitConfig, Runtime, evaluate, fit, run_status

STAGES = {
    "teacher": {"resolution": "hr", "title": "HR teacher"},
    "student": {"resolution": "lr", "title": "LR baseline student"},
    "kd_student": {"resolution": "lr", "title": "LR KD student"},
}
# Settings that must agree between the baseline and the KD student for their comparison to
# mean anything (same split is enforced separately, through split.csv).
COMPARABLE_SETTINGS = ("arch", "weights", "input_size", "epochs", "batch_size", "lr",
                       "weight_decay", "patience", "lr_patience", "lr_factor", "min_lr",
                       "monitor", "seed", "hflip", "crop_scale", "schedule", "warmup_epochs",
                       "mixup", "cutmix")
# Arguments that may differ between a run and its --resume.
RESUME_FREE = {"resume", "overwrite", "device", "compile", "cache_dir", "no_cache"}


# --- arguments -------------------------------------------------------------------------

def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="folder holding train.csv, test.csv, train/, upscale_train/, "
                             "test/ (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs"),
                        help="run folder: split.csv, the image cache and one sub-folder per "
                             "stage (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per batch (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true",
                        help="decode images into memory for this run only instead of using "
                             "the decoded-image cache")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="decoded-image cache (default: <out-dir>/cache); runs over the "
                             "same data can share one")
    parser.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                        help="bf16 autocast; auto = on with CUDA, off on the CPU "
                             "(default: %(default)s)")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="channels-last memory format; auto = on with CUDA "
                             "(default: %(default)s)")


def train_parser(stage: str) -> argparse.ArgumentParser:
    spec = STAGES[stage]
    parser = argparse.ArgumentParser(
        description=f"Train the {spec['title']} on the shared split; writes "
                    f"<out-dir>/{stage}/ (best.pt, last.pt, history.csv, config.json, "
                    f"train_summary.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common_arguments(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="resnet50",
                       help=f"torchvision classifier ({', '.join(TESTED_ARCHS)} are tested; "
                            f"any torchvision classification model name works)")
    model.add_argument("--weights", default="imagenet",
                       help="imagenet (torchvision's ImageNet weights), none (random init, "
                            "train from scratch), teacher (start from the HR teacher "
                            "<out-dir>/teacher/best.pt, which must be of the same --arch: "
                            "the teacher-initialised student, every layer but a fresh "
                            "classification head; give the baseline the same for a fair "
                            "comparison) or the path of a state dict or checkpoint")
    model.add_argument("--input-size", type=int, default=224,
                       help="network input size in pixels; images are resized to it "
                            "(an upsampled 64x64 image suits an ImageNet network far better "
                            "than a raw one)")
    train = parser.add_argument_group("training")
    train.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                       help="named preset of training (and, for the KD student, distillation) "
                            "settings; flags given explicitly override it: "
                            + "; ".join(f"{name}: {recipe_text(name)}" for name in RECIPES))
    train.add_argument("--epochs", type=int, default=30,
                       help="number of epochs (plateau: at most, early stopping may end "
                            "sooner; cosine: exactly)")
    train.add_argument("--schedule", choices=("plateau", "cosine"), default="plateau",
                       help="plateau: ReduceLROnPlateau on val loss + early stopping; cosine: "
                            "linear warm-up then cosine decay to --min-lr, every batch, for "
                            "exactly --epochs (a fixed budget, no early stop)")
    train.add_argument("--warmup-epochs", type=float, default=0.0,
                       help="cosine: epochs of linear learning-rate warm-up")
    train.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (peak)")
    train.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    train.add_argument("--lr-factor", type=float, default=0.5,
                       help="ReduceLROnPlateau: multiply the learning rate by this when the "
                            "validation loss stalls")
    train.add_argument("--lr-patience", type=int, default=2,
                       help="ReduceLROnPlateau: epochs without validation-loss improvement "
                            "before the learning rate drops")
    train.add_argument("--min-lr", type=float, default=1e-7,
                       help="lower bound of the learning rate (plateau), or where the "
                            "cosine decay ends")
    train.add_argument("--patience", type=int, default=5,
                       help="early stopping: epochs without improvement of --monitor")
    train.add_argument("--monitor", choices=("val_loss", "val_acc", "last"),
                       default="val_loss",
                       help="what selects best.pt and drives early stopping; last: the final "
                            "epoch's model (no selection on one noisy validation epoch; suits "
                            "--schedule cosine)")
    train.add_argument("--no-hflip", dest="hflip", action="store_false",
                       help="disable random horizontal flips")
    train.add_argument("--crop-scale", type=float, default=0.75,
                       help="random resized crop: smallest area fraction kept (1 = no crop)")
    train.add_argument("--mixup", type=float, default=0.0,
                       help="mixup: Beta(a, a) concentration a of the mixing share (0 = off; "
                            "the KD teacher sees the HR twin mixed with the same partner and "
                            "share)")
    train.add_argument("--cutmix", type=float, default=0.0,
                       help="cutmix: Beta(a, a) concentration a (0 = off); with --mixup too, "
                            "each batch takes one of the two; boxes fall on LR pixel "
                            "boundaries, so the HR twin gets exactly the same patch")
    train.add_argument("--seed", type=int, default=0,
                       help="fixes the split (when it is first made), initialisation, data "
                            "order and augmentation")
    train.add_argument("--deterministic", action="store_true",
                       help="also force deterministic algorithms (slower on GPU)")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the model (faster epochs on GPU after a slow "
                            "first one)")
    runs = parser.add_argument_group("run folder")
    runs.add_argument("--split-per-class", type=int, default=None, metavar="N",
                      help="when this stage makes the split (the first to run in --out-dir): "
                           "split a balanced subset of N labelled images per class, drawn "
                           "once and saved in split.csv, instead of every image (quick "
                           "iterations on large data); default: every image")
    runs.add_argument("--resume", action="store_true",
                      help="continue this stage from <out-dir>/<stage>/last.pt with the "
                           "same settings")
    runs.add_argument("--overwrite", action="store_true",
                      help="delete this stage's earlier results and start again")
    if stage == "kd_student":
        kd = parser.add_argument_group(
            "distillation", "Loss = alpha*CE + the terms --method names. Logit methods: kd "
            "(Hinton 2015), dkd (decoupled KD, Zhao 2022). Feature methods, on the last "
            "convolutional feature maps (teacher maps pooled to the student's size; a learned "
            "1x1 projection where channels differ): at (attention transfer, Zagoruyko 2017), "
            "cwd (channel-wise, Shu 2021), mgd (masked generative, Yang 2022), amd (angular "
            "margin, Jeon 2023; global and local maps 8:2). Defaults are the papers'.")
        kd.add_argument("--method", default="kd",
                        help="kd, dkd, at, cwd, mgd, amd, or a logit and feature methods "
                             "joined by + (kd+at, dkd+cwd+amd)")
        kd.add_argument("--teacher-ckpt", type=Path, nargs="+", default=None,
                        help="teacher checkpoint(s) (default: <out-dir>/teacher/best.pt); each "
                             "is frozen and sees the HR twin of the student's view; with "
                             "several, soft targets are their averaged probabilities")
        kd.add_argument("--teacher-weights", type=float, nargs="+", default=None,
                        help="one weight per teacher for the average (default: equal)")
        kd.add_argument("--feature-layers", default="last",
                        help="feature methods: comma-separated layers whose maps are compared, "
                             "summed over layers: last (the map entering avgpool) or module "
                             "names present in student and teacher (layer1,layer2,layer3,"
                             "layer4 for ResNets); teacher maps are pooled to the student's "
                             "size")
        kd.add_argument("--temperature", type=float, default=4.0,
                        help="softmax temperature T of the soft targets (kd, dkd)")
        kd.add_argument("--alpha", type=float, default=None,
                        help="weight of the hard-label cross-entropy (default: 0.7 with kd, "
                             "1.0 otherwise, as in the DKD and feature-method papers)")
        kd.add_argument("--beta", type=float, default=0.3,
                        help="kd: weight of T^2 * KL(teacher_T || student_T)")
        kd.add_argument("--dkd-alpha", type=float, default=1.0,
                        help="dkd: weight of target-class KD (TCKD)")
        kd.add_argument("--dkd-beta", type=float, default=8.0,
                        help="dkd: weight of non-target-class KD (NCKD)")
        kd.add_argument("--dkd-warmup", type=int, default=20,
                        help="dkd: epochs over which its term ramps up linearly (0: none)")
        kd.add_argument("--at-weight", type=float, default=1000.0,
                        help="at: weight of the attention-map loss")
        kd.add_argument("--cwd-weight", type=float, default=3.0,
                        help="cwd: weight of the channel-wise loss")
        kd.add_argument("--cwd-tau", type=float, default=4.0,
                        help="cwd: temperature of the per-channel spatial softmax")
        kd.add_argument("--mgd-weight", type=float, default=7e-5,
                        help="mgd: weight of the generation loss (summed squared error)")
        kd.add_argument("--mgd-mask", type=float, default=0.5,
                        help="mgd: share of student feature locations masked")
        kd.add_argument("--amd-weight", type=float, default=1.0,
                        help="amd: weight of the angular-margin loss (the paper's code gives "
                             "no weight for it; 1 is ours)")
        kd.add_argument("--teacher-cache", action="store_true",
                        help="kd/dkd with one teacher: compute its logits once on whole, "
                             "un-augmented HR images and reuse them every epoch: no teacher "
                             "forward per step and no HR images in memory, but the soft "
                             "targets then ignore the student's crop and flip (exact with "
                             "--no-hflip --crop-scale 1); default: online teacher on paired "
                             "views")
    return parser


def test_parser(stage: str) -> argparse.ArgumentParser:
    spec = STAGES[stage]
    parser = argparse.ArgumentParser(
        description=f"Evaluate the {spec['title']}'s best checkpoint on the test third of "
                    f"the split; writes <out-dir>/{stage}/test_metrics.json and "
                    f"test_predictions.csv. When all three stages are tested, also prints "
                    f"the comparison and writes the figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--ckpt", type=Path, default=None,
                        help=f"checkpoint to evaluate (default: <out-dir>/{stage}/best.pt)")
    parser.add_argument("--assets-dir", type=Path, default=Path("assets"),
                        help="where the comparison figures are written")
    return parser


# --- training --------------------------------------------------------------------------

# Bounds of every numeric training flag: (low, high, low inclusive, high inclusive).
FLAG_BOUNDS = {
    "lr": (0, None, False, True), "weight_decay": (0, None, True, True),
    "lr_factor": (0, 1, False, False), "lr_patience": (0, None, True, True),
    "min_lr": (0, None, True, True), "crop_scale": (0, 1, False, True),
    "warmup_epochs": (0, None, True, True), "mixup": (0, None, True, True),
    "cutmix": (0, None, True, True), "temperature": (0, None, False, True),
    "alpha": (0, None, True, True), "beta": (0, None, True, True),
    "dkd_alpha": (0, None, True, True), "dkd_beta": (0, None, True, True),
    "dkd_warmup": (0, None, True, True), "at_weight": (0, None, True, True),
    "cwd_weight": (0, None, True, True), "cwd_tau": (0, None, False, True),
    "mgd_weight": (0, None, True, True), "mgd_mask": (0, 1, True, False),
    "amd_weight": (0, None, True, True),
}


def _bounds_text(low, high, low_in, high_in) -> str:
    if high is None:
        return "at least 0" if low_in else "positive"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_arguments(args) -> None:
    """Every numeric flag in range, before any work starts: one line names the first bad one."""
    require_at_least_one({"--batch-size": args.batch_size,
                          "--epochs": getattr(args, "epochs", 1),
                          "--input-size": getattr(args, "input_size", 1),
                          "--patience": getattr(args, "patience", 1),
                          "--split-per-class": getattr(args, "split_per_class", None)})
    for name, (low, high, low_in, high_in) in FLAG_BOUNDS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        inside = (value >= low if low_in else value > low) and \
            (high is None or (value <= high if high_in else value < high))
        if not inside or value != value:        # value != value: NaN
            raise ToolError(f"--{name.replace('_', '-')} must be "
                            f"{_bounds_text(low, high, low_in, high_in)} (got {value})")
    if getattr(args, "min_lr", None) is not None and args.min_lr > args.lr:
        raise ToolError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if getattr(args, "schedule", None) == "cosine" and args.warmup_epochs >= args.epochs:
        raise ToolError(f"--warmup-epochs {args.warmup_epochs} leaves nothing of --epochs "
                        f"{args.epochs} for the cosine decay")


def cache_dir_for(args) -> Path | None:
    if args.no_cache:
        return None
    return ensure_writable_dir(args.cache_dir or Path(args.out_dir) / "cache", "--cache-dir")


def runtime_for(args, device: torch.device) -> Runtime:
    cuda = device.type == "cuda"
    choose = lambda setting: cuda if setting == "auto" else setting == "on"  # noqa: E731
    return Runtime(device=device, amp=choose(args.amp), channels_last=choose(args.channels_last))


def _prepare_stage_dir(stage_dir: Path, args) -> str:
    """Refuse to run over earlier results unless told; returns what the folder holds."""
    status = run_status(stage_dir)
    if args.resume and args.overwrite:
        raise ToolError("--resume and --overwrite contradict each other; give one")
    if args.resume and status == "none":
        raise ToolError(f"--resume: nothing to resume in {stage_dir} (no last.pt)")
    if status != "none" and not (args.resume or args.overwrite):
        article = "an" if status == "unfinished" else "a"
        raise ToolError(f"{stage_dir} already holds {article} {status} run; pass --resume to "
                        f"continue it or --overwrite to replace it")
    # With --overwrite the old run is deleted only once every input has loaded
    # (_clear_for_overwrite), so a bad input never costs the earlier results.
    return "none" if args.overwrite else status


def _clear_for_overwrite(stage_dir: Path, args) -> None:
    if args.overwrite and stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)


def _check_resume_settings(stage_dir: Path, args_dict: dict) -> dict:
    config = read_json(stage_dir / "config.json")
    saved = config.get("args", {})
    differences = [f"--{key.replace('_', '-')} {saved.get(key)!r} -> {value!r}"
                   for key, value in args_dict.items()
                   if key not in RESUME_FREE and saved.get(key) != value]
    if differences:
        raise ToolError(f"--resume with other settings than the saved run "
                        f"({'; '.join(differences)}); resume with the saved settings or "
                        f"use --overwrite")
    return config


def jsonable(args: argparse.Namespace) -> dict:
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value
    return {key: plain(value) for key, value in vars(args).items()}


def parse_train_arguments(stage: str, argv=None) -> argparse.Namespace:
    """The train script's arguments with its ``--recipe``'s defaults filled in."""
    parser = train_parser(stage)
    recipe = parser.parse_args(argv).recipe
    destinations = {action.dest for action in parser._actions}
    parser.set_defaults(**recipe_defaults(recipe, destinations, stage))
    return parser.parse_args(argv)


def resolve_init_weights(args, out_dir: Path) -> None:
    """``--weights teacher``: the HR teacher's checkpoint as the student's starting point
    (the first ``--teacher-ckpt`` of a KD student, else <out-dir>/teacher/best.pt), which
    must be of the student's architecture."""
    if args.weights != "teacher":
        return
    teacher_ckpts = getattr(args, "teacher_ckpt", None)
    ckpt = Path(teacher_ckpts[0]) if teacher_ckpts else Path(out_dir) / "teacher" / "best.pt"
    _, meta = load_checkpoint(ckpt, what="--weights teacher: teacher checkpoint")
    if meta["arch"] != args.arch:
        raise ToolError(f"--weights teacher: the teacher {ckpt} is a {meta['arch']}, the "
                        f"student a {args.arch}; starting from the teacher needs the same "
                        f"--arch")
    args.weights = str(ckpt)


def train_main(stage: str, argv=None) -> int:
    args = parse_train_arguments(stage, argv)
    check_arguments(args)
    resolution = STAGES[stage]["resolution"]
    out_dir = ensure_writable_dir(args.out_dir)
    stage_dir = out_dir / stage
    if stage == "kd_student":
        args.teacher_ckpt = args.teacher_ckpt or [out_dir / "teacher" / "best.pt"]
        parts = parse_method(args.method)
        if args.alpha is None:
            args.alpha = 0.7 if "kd" in parts else 1.0
        if args.teacher_cache and (args.mixup > 0 or args.cutmix > 0):
            raise ToolError("--teacher-cache keeps the teacher's logits of whole unmixed "
                            "images; with --mixup or --cutmix the teacher must see each "
                            "mixed view (drop --teacher-cache)")
    resolve_init_weights(args, out_dir)
    args_dict = jsonable(args)
    if _prepare_stage_dir(stage_dir, args) == "finished":  # only reachable with --resume
        print(f"{stage_dir} holds a finished run; nothing to resume "
              f"(use --overwrite to train again)")
        return 0
    config = _check_resume_settings(stage_dir, args_dict) if args.resume else None

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    device = pick_device(args.device)
    runtime = runtime_for(args, device)

    split = load_or_create_split(args.data_dir, out_dir, args.seed,
                                 per_class=args.split_per_class)
    view_sizes = {resolution: args.input_size}
    teachers, teacher_metas = [], []
    if stage == "kd_student":
        # Load (and so check) the teachers before the slow image decoding.
        for ckpt in args.teacher_ckpt:
            teacher, meta = load_checkpoint(ckpt, classes=split.classes,
                                            what="teacher checkpoint")
            if meta.get("resolution") != "hr":
                raise ToolError(f"teacher checkpoint {ckpt} was trained on "
                                f"{str(meta.get('resolution')).upper()} images; the KD "
                                f"teacher must be an HR model (train_teacher.py)")
            teachers.append(teacher)
            teacher_metas.append(meta)
        view_sizes["hr"] = int(teacher_metas[0]["input_size"])
    model = build_model(args.arch, len(split.classes), args.weights)
    cache_dir = cache_dir_for(args)
    teacher_logits = None
    if stage == "kd_student" and args.teacher_cache:
        if len(teachers) > 1:
            raise ToolError("--teacher-cache takes one teacher checkpoint")
        teacher_logits = _teacher_logits(teachers[0], teacher_metas[0], args.teacher_ckpt[0],
                                         split, args.data_dir, cache_dir, args.batch_size,
                                         runtime)
        del view_sizes["hr"]    # the student alone needs images from here on
    images = ImageSet.load(split, args.data_dir, sorted(view_sizes), cache_dir)

    if stage == "kd_student":
        weights = LossWeights(
            alpha=args.alpha, beta=args.beta, temperature=args.temperature,
            dkd_alpha=args.dkd_alpha, dkd_beta=args.dkd_beta, dkd_warmup=args.dkd_warmup,
            at=args.at_weight, cwd=args.cwd_weight, cwd_tau=args.cwd_tau, mgd=args.mgd_weight,
            mgd_mask=args.mgd_mask, amd=args.amd_weight,
            teacher_weights=args.teacher_weights or [1.0] * len(teachers),
            feature_layers=tuple(layer.strip() for layer in args.feature_layers.split(",")
                                 if layer.strip()) or ("last",))
        objective = Distiller(model, [] if teacher_logits is not None else teachers,
                              args.method, weights,
                              [int(meta["input_size"]) for meta in teacher_metas],
                              cached_teacher_logits=teacher_logits,
                              probe_size=args.input_size)
    else:
        objective = HardLabels(model, resolution)
    objective.to(device)
    if runtime.channels_last:
        objective.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile()

    _clear_for_overwrite(stage_dir, args)
    record = run_record(args_dict, {
        "stage": stage, "device": _device_name(device),
        "split": {"seed": split.seed, "fingerprint": split.fingerprint,
                  "classes": len(split.classes)},
        "image_sizes": {key: images.image_size(key) for key in images.pixels},
        "teacher": {"checkpoints": [str(ckpt) for ckpt in args.teacher_ckpt],
                    "archs": [meta["arch"] for meta in teacher_metas],
                    "input_sizes": [meta["input_size"] for meta in teacher_metas],
                    "method": args.method,
                    "mode": "cached logits" if teacher_logits is not None
                    else "online, paired views"} if teacher_metas else None,
    })
    if config is not None:
        record["resumed"] = config.get("resumed", []) + [record.pop("command")]
        record["command"] = config.get("command")
    write_json(stage_dir / "config.json", record)

    print(f"{STAGES[stage]['title']}: {args.arch} ({args.weights} weights) on "
          f"{resolution.upper()} {images.image_size(resolution)}px -> {args.input_size}px, "
          f"{len(split.indices('train'))} train / {len(split.indices('val'))} val images, "
          f"{_device_name(device)}")
    cfg = FitConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, lr_factor=args.lr_factor, lr_patience=args.lr_patience,
        min_lr=args.min_lr, patience=args.patience, monitor=args.monitor, hflip=args.hflip,
        crop_scale=args.crop_scale, seed=args.seed, amp=runtime.amp,
        channels_last=runtime.channels_last, view_sizes=view_sizes, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, mixup=args.mixup, cutmix=args.cutmix)
    meta = {"stage": stage, "arch": args.arch, "classes": split.classes,
            "resolution": resolution, "input_size": args.input_size,
            "image_size": images.image_size(resolution), "seed": args.seed,
            "split_fingerprint": split.fingerprint}
    summary = fit(objective, images, cfg, stage_dir, runtime, meta, resume=args.resume)
    print(f"done: best epoch {summary['best_epoch']} of {summary['epochs_run']} "
          f"({summary['train_seconds']:.0f}s) -> {stage_dir / 'best.pt'}")
    return 0


def _teacher_logits(teacher, teacher_meta: dict, teacher_ckpt: Path, split, data_dir: Path,
                    cache_dir: Path | None, batch_size: int, runtime: Runtime) -> torch.Tensor:
    """The teacher's logits for every row of the split (whole un-augmented HR images), kept
    in the cache keyed by the teacher checkpoint's bytes and the split."""
    digest = hashlib.sha256(Path(teacher_ckpt).read_bytes())
    digest.update(split.fingerprint.encode())
    cache_file = cache_dir / f"teacher-logits-{digest.hexdigest()[:16]}.pt" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        print(f"teacher logits from {cache_file}")
        return torch.load(cache_file, weights_only=True)
    images = ImageSet.load(split, data_dir, ["hr"], cache_dir)
    result = evaluate(HardLabels(teacher, "hr").to(runtime.device), images,
                      np.arange(len(split.frame)), {"hr": int(teacher_meta["input_size"])},
                      batch_size, runtime, description="teacher logits")
    teacher.cpu()
    if cache_file is not None:
        save_torch(cache_file, result["logits"])
        print(f"cached teacher logits for {len(split.frame)} images -> {cache_file}")
    return result["logits"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


# --- testing ---------------------------------------------------------------------------

def test_main(stage: str, argv=None) -> int:
    args = test_parser(stage).parse_args(argv)
    check_arguments(args)
    split = load_saved_split(args.data_dir, args.out_dir)
    test_stage(stage, split, args, args.ckpt)
    compare_stages(args.out_dir, args.assets_dir)
    return 0


def load_saved_split(data_dir: Path, out_dir: Path):
    """The split the stages were trained on; testing must never make a new one."""
    if not (Path(out_dir) / "split.csv").exists():
        raise ToolError(f"no split in {out_dir} (split.csv); train the stages first")
    return load_or_create_split(data_dir, out_dir, seed=-1, quiet=True)


def test_stage(stage: str, split, args, ckpt: Path | None = None,
               features: bool = False) -> dict:
    """Evaluate a stage's checkpoint on the test rows; writes ``test_metrics.json`` and
    ``test_predictions.csv`` in the stage folder. ``args`` needs data_dir, out_dir, device,
    batch_size, no_cache, amp, channels_last. Returns the metrics with logits, labels and
    (with ``features``) penultimate features."""
    out_dir = Path(args.out_dir)
    stage_dir = out_dir / stage
    ckpt = ckpt or stage_dir / "best.pt"
    model, meta = load_checkpoint(ckpt, classes=split.classes, what=f"{stage} checkpoint")
    resolution = meta["resolution"]
    device = pick_device(args.device)
    runtime = runtime_for(args, device)
    cache_dir = cache_dir_for(args)
    images = ImageSet.load(split, args.data_dir, [resolution], cache_dir)
    objective = HardLabels(model, resolution).to(device)
    test_idx = split.indices("test")
    result = evaluate(objective, images, test_idx, {resolution: meta["input_size"]},
                      args.batch_size, runtime, description=f"testing {stage}",
                      features=features)

    predictions = result["logits"].argmax(1).numpy()
    confidence = result["logits"].softmax(1).max(1).values.numpy()
    rows = split.frame.iloc[test_idx]
    write_csv(stage_dir / "test_predictions.csv", pd.DataFrame({
        "img_path": rows["img_path"].to_numpy(), "label": rows["label"].to_numpy(),
        "prediction": [split.classes[index] for index in predictions],
        "confidence": confidence.round(6)}))
    metrics = {"stage": stage, "accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
               "n": result["n"], "loss": result["loss"], "checkpoint": str(ckpt),
               "arch": meta["arch"], "resolution": resolution,
               "image_size": meta.get("image_size"), "input_size": meta["input_size"],
               "best_epoch": meta.get("epoch"), "split_fingerprint": split.fingerprint}
    write_json(stage_dir / "test_metrics.json", metrics)
    print(f"{STAGES[stage]['title']}: test accuracy {100 * metrics['accuracy']:.2f}%  "
          f"macro-F1 {100 * metrics['macro_f1']:.2f}%  (n={metrics['n']}) "
          f"-> {stage_dir / 'test_metrics.json'}")
    return {**metrics, "logits": result["logits"], "labels": result["labels"],
            "features": result.get("features"), "test_index": test_idx}


def compare_stages(out_dir: Path, assets_dir: Path) -> dict | None:
    """When all three stages are tested: the comparison table, comparison.json, figures."""
    metrics_files = {stage: Path(out_dir) / stage / "test_metrics.json" for stage in STAGES}
    if not all(path.exists() for path in metrics_files.values()):
        missing = [stage for stage, path in metrics_files.items() if not path.exists()]
        print(f"(comparison after the remaining test stage(s): {', '.join(missing)})")
        return None
    metrics = {stage: read_json(path) for stage, path in metrics_files.items()}
    fingerprints = {m.get("split_fingerprint") for m in metrics.values()}
    if len(fingerprints) != 1:
        raise ToolError(f"the test metrics in {out_dir} come from different splits; "
                        f"rerun the test scripts")
    warnings = comparability_warnings(out_dir)

    print()
    print(f"{'model':<22}{'input':<16}{'accuracy':>10}{'macro-F1':>10}{'n':>7}")
    for stage, m in metrics.items():
        size = f"{m['resolution'].upper()} {m['image_size']}->{m['input_size']}"
        print(f"{STAGES[stage]['title']:<22}{size:<16}{100 * m['accuracy']:>9.2f}%"
              f"{100 * m['macro_f1']:>9.2f}%{m['n']:>7}")
    teacher, baseline, kd = metrics["teacher"], metrics["student"], metrics["kd_student"]
    gain = kd["accuracy"] - baseline["accuracy"]
    gap = teacher["accuracy"] - baseline["accuracy"]
    interval = students_interval(out_dir)
    print(f"KD - baseline: {100 * gain:+.2f} points accuracy "
          f"[95% CI {100 * interval['accuracy']['low']:+.2f}, "
          f"{100 * interval['accuracy']['high']:+.2f}], "
          f"{100 * (kd['macro_f1'] - baseline['macro_f1']):+.2f} points macro-F1 "
          f"[{100 * interval['macro_f1']['low']:+.2f}, {100 * interval['macro_f1']['high']:+.2f}]"
          + (f"; {100 * gain / gap:.0f}% of the teacher-baseline gap closed" if gap > 0 else ""))
    print(f"(one run each on {baseline['n']} test images; the interval is a paired bootstrap "
          f"over those images, so it covers test-set noise, not training noise: "
          f"compare_recipes.py gives the spread over seeds)")
    for warning in warnings:
        print(f"warning: {warning}")

    comparison = {"models": metrics, "kd_minus_baseline": {
        "accuracy": gain, "macro_f1": kd["macro_f1"] - baseline["macro_f1"],
        "interval_95": interval},
        "comparable": not warnings, "warnings": warnings}
    write_json(Path(out_dir) / "comparison.json", comparison)
    written = plot_comparison_figures(metrics, out_dir, assets_dir)
    print("figures: " + ", ".join(str(path) for path in written))
    return comparison


def students_interval(out_dir: Path, resamples: int = 10_000) -> dict:
    """Paired bootstrap 95% interval of KD student - baseline on their test predictions."""
    frames = [pd.read_csv(Path(out_dir) / stage / "test_predictions.csv")
              for stage in ("student", "kd_student")]
    if not frames[0]["img_path"].equals(frames[1]["img_path"]):
        raise ToolError(f"the two students in {out_dir} were tested on other images; rerun "
                        f"the test scripts")
    classes = sorted(set(frames[0]["label"]) | set(frames[0]["prediction"])
                     | set(frames[1]["prediction"]))
    ids = {name: number for number, name in enumerate(classes)}
    labels, baseline, kd = (frame.map(ids.get).to_numpy() for frame in
                            (frames[0]["label"], frames[0]["prediction"], frames[1]["prediction"]))
    return paired_bootstrap(labels, baseline, kd, len(classes), resamples=resamples)


def plot_comparison_figures(metrics: dict, out_dir: Path, assets_dir: Path) -> list[Path]:
    """The test comparison bars of the stages in ``metrics`` and, when both students have a
    history, the kd_vs_hard_{train,val}_{acc,loss} curves. Returns the files written."""
    assets_dir = ensure_writable_dir(assets_dir, "--assets-dir")
    written = [plot_comparison({STAGES[s]["title"]: m for s, m in metrics.items()},
                               assets_dir / "test_accuracy_comparison.png")]
    histories = {"baseline (hard labels)": Path(out_dir) / "student" / "history.csv",
                 "KD student": Path(out_dir) / "kd_student" / "history.csv"}
    if all(path.exists() for path in histories.values()):
        frames = {name: pd.read_csv(path) for name, path in histories.items()}
        for split_name in ("train", "val"):
            # Training loss is plotted as plain cross-entropy: the KD run's total loss has an
            # extra term and would not be on the baseline's scale.
            for kind, column, label in (("acc", f"{split_name}_acc", "accuracy"),
                                        ("loss", "train_ce" if split_name == "train"
                                         else "val_loss", "cross-entropy")):
                path = assets_dir / f"kd_vs_hard_{split_name}_{kind}.png"
                written.append(plot_curves(frames, column, f"{split_name} {label}", path))
    return written


def comparability_warnings(out_dir: Path) -> list[str]:
    configs = {}
    for stage in ("student", "kd_student"):
        path = Path(out_dir) / stage / "config.json"
        if path.exists():
            configs[stage] = read_json(path).get("args", {})
    if len(configs) < 2:
        return ["no config.json for both students; cannot confirm like-for-like settings"]
    differing = [f"{key} ({configs['student'].get(key)!r} vs "
                 f"{configs['kd_student'].get(key)!r})"
                 for key in COMPARABLE_SETTINGS
                 if configs["student"].get(key) != configs["kd_student"].get(key)]
    if differing:
        return ["baseline and KD student were trained with different settings: "
                + ", ".join(differing)]
    return []
