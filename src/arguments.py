"""The command-line arguments of the train and test scripts: the stages, their parsers,
the ``--recipe`` presets filled in as defaults, and the range check of every numeric flag
(run before any work starts, so a bad value costs nothing).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .cli import ToolError, read_json, require_at_least_one
from .data import set_path_policy
from .distill import normalised_teacher_weights
from .methods import add_method_arguments, method_flag_bounds, preset_for_method
from .models import TESTED_ARCHS, checkpoint_stage
from .tracking import add_tracker_arguments
from .transfer import add_transfer_arguments
from .recipes import DEFAULT_RECIPE, NEEDS_UNLABELLED, RECIPES, preset_note, recipe_defaults, \
    recipe_text

STAGES = {
    "teacher": {"resolution": "hr", "title": "HR teacher"},
    "student": {"resolution": "lr", "title": "LR baseline student"},
    "kd_student": {"resolution": "lr", "title": "LR KD student"},
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except for ``--no-X`` switches: their "(default: True)" (the
    value of X) reads as if the switch were on by default."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreFalseAction):
            return action.help
        return super()._get_help_string(action)


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
                        help="images per batch; under torchrun the global batch, shared among "
                             "the processes (default: %(default)s)")
    parser.add_argument("--strict-paths", action="store_true",
                        help="refuse image paths that lead outside their data folder "
                             "(absolute, '..', symbolic links) instead of warning")
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
    """The train script's parser: each group of flags built where its concern lives."""
    spec = STAGES[stage]
    parser = argparse.ArgumentParser(
        description=f"Train the {spec['title']} on the shared split; writes "
                    f"<out-dir>/{stage}/ (best.pt, last.pt, history.csv, config.json, "
                    f"train_summary.json).",
        formatter_class=HelpFormatter)
    common_arguments(parser)
    add_tracker_arguments(parser)
    parser.add_argument("--config", type=Path, default=None,
                        help="RUN/config.json written by an earlier run of this stage: its "
                             "settings become the defaults and flags given here win "
                             "(--config runs/teacher/config.json --out-dir runs2 reruns it)")
    _model_arguments(parser)
    _training_arguments(parser)
    _run_folder_arguments(parser)
    if stage == "kd_student":
        _teacher_arguments(parser)
        add_method_arguments(parser)
        add_transfer_arguments(parser)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="resnet50",
                       help=f"torchvision classifier by name ({', '.join(TESTED_ARCHS)}, "
                            f"vit_b_16, swin_t are tested; any works) or timm:<name> for a "
                            f"timm model (timm:vit_small_patch16_224, "
                            f"timm:beit_base_patch16_224, timm:convnext_tiny ...)")
    model.add_argument("--weights", default="imagenet",
                       help="imagenet (the library's ImageNet weights: torchvision's, or "
                            "timm's from the Hugging Face Hub), none (random init, "
                            "train from scratch), teacher (start from the HR teacher "
                            "<out-dir>/teacher/best.pt, which must be of the same --arch: "
                            "the teacher-initialised student, every layer but a fresh "
                            "classification head; give the baseline the same for a fair "
                            "comparison) or the path of a state dict or checkpoint")
    model.add_argument("--partial-weights", action="store_true",
                       help="with --weights PATH (or teacher): start even if some of the "
                            "model's tensors below the head are not in the file, leaving them "
                            "at random (without it such a file is refused)")
    model.add_argument("--input-size", type=int, default=224,
                       help="network input size in pixels; images are resized to it "
                            "(an upsampled 64x64 image suits an ImageNet network far better "
                            "than a raw one); ViT and BEiT are built for it (position "
                            "embeddings resized by their library) and need a multiple of "
                            "their patch size")


def _training_arguments(parser: argparse.ArgumentParser) -> None:
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
    train.add_argument("--layer-decay", type=float, default=None,
                       help="layer-wise learning-rate decay: each layer's rate is --lr times "
                            "this to the power of its distance from the head (BEiT's "
                            "fine-tuning; 1 = off); default: 0.75 for transformers starting "
                            "from --weights imagenet, off otherwise (CNNs, from scratch)")
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
                       help="early stopping: epochs without improvement of --select-by")
    # dest "monitor": its older name, kept in config.json and as an alias. Under torchrun
    # only --select-by works: torchrun reads --monitor as its own --monitor-interval.
    train.add_argument("--select-by", "--monitor", dest="monitor",
                       choices=("val_loss", "val_acc", "val_macro_f1", "last"),
                       default="val_loss",
                       help="what selects best.pt and drives early stopping: validation loss "
                            "(lowest), accuracy or macro-F1 (highest; DACON scores macro-F1); "
                            "last: the final epoch's model (no selection on one noisy "
                            "validation epoch; suits --schedule cosine); --monitor is its older "
                            "name, which torchrun mistakes for its own --monitor-interval")
    train.add_argument("--no-hflip", dest="hflip", action="store_false",
                       help="disable random horizontal flips (flips are on without this flag)")
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
    train.add_argument("--sync-bn", action="store_true",
                       help="under torchrun on CUDA: BatchNorm statistics over the global "
                            "batch (SyncBatchNorm) instead of each process's share")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the model (faster epochs on GPU after a slow "
                            "first one)")


def _run_folder_arguments(parser: argparse.ArgumentParser) -> None:
    runs = parser.add_argument_group("run folder")
    runs.add_argument("--split-per-class", type=int, default=None, metavar="N",
                      help="when this stage makes the split (the first to run in --out-dir): "
                           "split a balanced subset of N labelled images per class, drawn "
                           "once and saved in split.csv, instead of every image (quick "
                           "iterations on large data); default: every image")
    runs.add_argument("--final-fit", action="store_true",
                      help="the last step of a competition, once a recipe and budget are "
                           "chosen: train on every labelled image of the split (train, val "
                           "and test rows) with no validation, into <out-dir>/<stage>_final; "
                           "needs a fixed budget (--schedule cosine --select-by last, as the "
                           "consistent and transfer recipes set); submit it with predict.py "
                           "--ckpt, never score it with the test scripts (it trained on their "
                           "images)")
    runs.add_argument("--resume", action="store_true",
                      help="continue this stage from <out-dir>/<stage>/last.pt with the "
                           "same settings")
    runs.add_argument("--overwrite", action="store_true",
                      help="delete this stage's earlier results and start again")


def _teacher_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "distillation", "The frozen teachers and what they are shown; the loss terms are in "
                        "'distillation methods'.")
    group.add_argument("--teacher-ckpt", type=Path, nargs="+", default=None,
                       help="teacher checkpoint(s) (default: <out-dir>/teacher/best.pt); each "
                            "is frozen and sees the HR twin of the student's view; with "
                            "several, soft targets are their averaged probabilities")
    group.add_argument("--teacher-weights", type=float, nargs="+", default=None,
                       help="one weight per teacher for the average (default: equal)")
    group.add_argument("--feature-layers", default="last",
                       help="feature methods: comma-separated layers whose maps are compared, "
                            "summed over layers: last (the last map before pooling: the input "
                            "of avgpool in CNNs and Swin, ViT patch tokens on their grid) or "
                            "module names present in student and teacher (layer1,layer2,"
                            "layer3,layer4 for ResNets; blocks.N for timm ViTs); teacher maps "
                            "are pooled to the student's size")
    group.add_argument("--teacher-cache", action="store_true",
                       help="logit methods with one teacher: compute its logits once on "
                            "whole, un-augmented HR images and reuse them every epoch: no "
                            "teacher forward per step and no HR images in memory, but the "
                            "soft targets then ignore the student's crop and flip (exact with "
                            "--no-hflip --crop-scale 1); default: online teacher on paired "
                            "views")
    group.add_argument("--lr-from-hr", action="store_true",
                       help="render each training view's LR image from its HR twin, shifted "
                            "by a random 0 to scale-1 HR pixels and box-filtered: LR images "
                            "at sampling phases the LR set lacks, each labelled by the "
                            "teacher from the same shifted HR view (needs LR images that are "
                            "their HR twins box-filtered, as make_demo_data.py writes; "
                            "checked before training)")


def test_parser(stage: str) -> argparse.ArgumentParser:
    spec = STAGES[stage]
    parser = argparse.ArgumentParser(
        description=f"Evaluate the {spec['title']}'s best checkpoint on the test tenth of "
                    f"the 8:1:1 split; writes <out-dir>/{stage}/test_metrics.json and "
                    f"test_predictions.csv. When all three stages are tested, also prints "
                    f"the comparison and writes the figures.",
        formatter_class=HelpFormatter)
    common_arguments(parser)
    parser.add_argument("--ckpt", type=Path, default=None,
                        help=f"checkpoint to evaluate (default: <out-dir>/{stage}/best.pt)")
    figures_argument(parser, "the comparison figures")
    add_tracker_arguments(parser)
    return parser


def figures_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--assets-dir", type=Path, default=None,
                        help=f"where {what} are written (default: <out-dir>/figures, so each "
                             f"run keeps its own; the README's figures are made with "
                             f"--assets-dir assets)")


def figures_dir(args) -> Path:
    return args.assets_dir or Path(args.out_dir) / "figures"


# Bounds of every numeric training flag but the methods' (their modules give theirs):
# (low, high, low inclusive, high inclusive).
FLAG_BOUNDS = {
    "lr": (0, None, False, True), "weight_decay": (0, None, True, True),
    "lr_factor": (0, 1, False, False), "lr_patience": (0, None, True, True),
    "min_lr": (0, None, True, True), "crop_scale": (0, 1, False, True),
    "warmup_epochs": (0, None, True, True), "mixup": (0, None, True, True),
    "cutmix": (0, None, True, True), "alpha": (0, None, True, True),
    "layer_decay": (0, 1, False, True), "unlabelled_ratio": (0, None, False, True),
    "seed": (0, None, True, True),
}


def _bounds_text(low, high, low_in, high_in) -> str:
    if high is None:
        return "at least 0" if low_in else "positive"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_arguments(args) -> None:
    """Every numeric flag in range, before any work starts: one line names the first bad one,
    and says so where the ``--recipe`` preset set the value it names. Also puts
    --strict-paths in force for the images the script will read."""
    try:
        _check_arguments(args)
    except ToolError as error:
        raise ToolError(f"{error}{preset_note(args, str(error))}") from None


def _check_arguments(args) -> None:
    set_path_policy(args)
    require_at_least_one({"--batch-size": args.batch_size,
                          "--epochs": getattr(args, "epochs", 1),
                          "--input-size": getattr(args, "input_size", 1),
                          "--patience": getattr(args, "patience", 1),
                          "--split-per-class": getattr(args, "split_per_class", None)})
    for name, (low, high, low_in, high_in) in {**FLAG_BOUNDS, **method_flag_bounds()}.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = f"--{name.replace('_', '-')}"
        if not math.isfinite(value):            # nan, inf: no range holds them
            raise ToolError(f"{flag} must be a finite number (got {value})")
        inside = (value >= low if low_in else value > low) and \
            (high is None or (value <= high if high_in else value < high))
        if not inside:
            raise ToolError(f"{flag} must be {_bounds_text(low, high, low_in, high_in)} "
                            f"(got {value})")
    if getattr(args, "teacher_weights", None):
        # The weights' own check, before any work (their count against the teachers is
        # checked where the teachers are known).
        normalised_teacher_weights(args.teacher_weights, len(args.teacher_weights))
    if getattr(args, "min_lr", None) is not None and args.min_lr > args.lr:
        raise ToolError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if getattr(args, "recipe", None) in NEEDS_UNLABELLED and hasattr(args, "unlabelled") \
            and args.unlabelled is None:
        raise ToolError(f"--recipe {args.recipe} needs --unlabelled PATH: images without labels "
                        f"for the teacher to label (a folder, or a CSV with upscale_img_path)")
    if getattr(args, "unlabelled", None) is not None \
            and round(args.unlabelled_ratio * args.batch_size) < 1:
        # A batch of B labelled rows takes round(R x B) unlabelled ones (the last, smaller
        # batch fewer): below one per full batch the transfer set would never be seen.
        raise ToolError(f"--unlabelled-ratio {args.unlabelled_ratio:g} gives no unlabelled "
                        f"image in a batch of {args.batch_size} (round({args.unlabelled_ratio:g}"
                        f" x {args.batch_size}) = 0); use at least "
                        f"{0.5 / args.batch_size:.3g}, or drop --unlabelled")
    if getattr(args, "final_fit", False) and (args.schedule, args.monitor) != ("cosine", "last"):
        raise ToolError(f"--final-fit trains with no validation images, so nothing can stop "
                        f"it early or select an epoch: give a fixed budget with --schedule "
                        f"cosine --select-by last (or --recipe consistent), not --schedule "
                        f"{args.schedule} --select-by {args.monitor}")
    if getattr(args, "schedule", None) == "cosine" and args.warmup_epochs >= args.epochs:
        raise ToolError(f"--warmup-epochs {args.warmup_epochs} leaves nothing of --epochs "
                        f"{args.epochs} for the cosine decay")


def jsonable(args: argparse.Namespace) -> dict:
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value
    return {key: plain(value) for key, value in vars(args).items()}


def parse_train_arguments(stage: str, argv=None) -> argparse.Namespace:
    """The train script's arguments: flags given win over ``--config``'s saved settings,
    which win over the ``--recipe`` preset's defaults (a ``--recipe`` given with
    ``--config`` applies its preset over the saved settings)."""
    parser = train_parser(stage)
    saved = config_defaults(parser, stage, argv)
    if "--recipe" in given_options(argv):
        # The preset named now owns every setting a preset sets (the parser's default
        # where it sets none), not the saved run's.
        saved = {key: value for key, value in saved.items() if key not in PRESET_SETTINGS}
    parser.set_defaults(**saved)
    if not saved or "--recipe" in given_options(argv):
        parser.set_defaults(**_preset_for(parser, stage, argv))
    return parser.parse_args(argv)


# Settings about the run folder, not the training: a rerun from a record starts afresh.
# Trackers are never switched on by a record: rerunning a colleague's run must not log to
# their W&B project unless asked on the command line.
NOT_FROM_CONFIG = {"resume", "overwrite", "config", "tensorboard", "wandb", "wandb_project"}
PRESET_SETTINGS = {key for preset in RECIPES.values() for key in preset}


def given_options(argv) -> set[str]:
    """The options written on a command line (``--lr=0.1`` counts as ``--lr``)."""
    return {token.split("=")[0] for token in (argv or []) if token.startswith("--")}


def read_run_record(path: Path, stages, reader: str) -> dict:
    """The ``config.json`` a train stage wrote at ``path``, checked to be a record of one
    of ``stages`` (what ``reader``, the script, takes); one line otherwise."""
    try:
        record = read_json(path)
    except ToolError as error:
        raise ToolError(f"--config {error}") from None
    if not isinstance(record, dict) or not isinstance(record.get("args"), dict) \
            or record.get("stage") not in STAGES:
        raise ToolError(f"--config {path} is not a run's config.json (no stage and args)")
    if record["stage"] not in stages:
        raise ToolError(f"--config {path} records a train_{record['stage']}.py run; "
                        f"{reader} takes a {' or '.join(stages)} run's config.json")
    return record


# What a runner sets itself for each stage folder, never taken from a run's record.
RUNNER_SETTINGS = NOT_FROM_CONFIG | {"data_dir", "out_dir", "seed", "teacher_ckpt",
                                     "teacher_weights", "final_fit", "split_per_class"}


def config_flags(path: Path, reader: str) -> list[str]:
    """A run's recorded settings as train-script flags, for a runner's shared flags (those
    after -- come later and win): each setting that differs from its preset's default,
    less what the runner sets itself. A teacher checkpoint the run started from is
    ``--weights teacher``: the runner's own split's teacher."""
    record = read_run_record(path, tuple(STAGES), reader)
    stage, saved = record["stage"], record["args"]
    recipe = saved.get("recipe", DEFAULT_RECIPE)
    defaults = jsonable(parse_train_arguments(stage, ["--recipe", recipe]))
    parser, flags = train_parser(stage), ["--recipe", recipe]
    for action in parser._actions:
        dest, option = action.dest, (action.option_strings or [None])[0]
        value = saved.get(dest)
        if option is None or dest in RUNNER_SETTINGS | {"recipe"} or value is None \
                or value == defaults.get(dest):
            continue
        if dest == "weights" and value not in ("none", "imagenet") \
                and checkpoint_stage(value) == "teacher":
            value = "teacher"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            flags.append(option)
        else:
            flags += [option, *map(str, value if isinstance(value, list) else [value])]
    return flags


def config_defaults(parser: argparse.ArgumentParser, stage: str, argv) -> dict:
    """The settings of the run whose ``config.json`` ``--config`` names, as defaults for
    ``parser``; {} without --config. A record of another stage, or one holding settings this
    version has no flag for, is refused in one line."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config", type=Path, default=None)
    path = finder.parse_known_args(argv)[0].config
    if path is None:
        return {}
    record = read_run_record(path, (stage,), f"train_{stage}.py")
    known = {action.dest for action in parser._actions}
    unknown = sorted(key for key in record["args"] if key not in known)
    if unknown:
        raise ToolError(f"--config {path} holds settings this version has no flag for "
                        f"({', '.join('--' + key.replace('_', '-') for key in unknown)}): "
                        f"written by another version of the tool "
                        f"({record.get('code_version') or 'unknown commit'})")
    saved = {key: value for key, value in record["args"].items() if key not in NOT_FROM_CONFIG}
    return _checked_by_the_parser(parser, saved, path)


class _RecordError(Exception):
    pass


def _checked_by_the_parser(parser: argparse.ArgumentParser, saved: dict, path: Path) -> dict:
    """The record's settings as the parser reads them from a command line: each value
    written back as its flag and parsed, so a record someone edited (a float batch size,
    an unknown schedule) is refused in one line naming the record, before any work, like
    the same flag typed."""
    flags = []
    for action in parser._actions:
        if action.dest not in saved or not action.option_strings:
            continue
        value, option = saved[action.dest], action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ToolError(f"--config {path}: {option} is recorded as {value!r}, not "
                                f"true or false (a value in the record; fix or remove it "
                                f"there)")
            if value != action.default:
                flags.append(option)
        elif value is not None:
            flags += [option, *map(str, value if isinstance(value, list) else [value])]
    checker = argparse.ArgumentParser(add_help=False)
    checker._actions, checker._option_string_actions = parser._actions, \
        parser._option_string_actions

    def refuse(message):
        raise _RecordError(message)
    checker.error = refuse
    try:
        parsed = vars(checker.parse_args(flags))
    except _RecordError as error:
        raise ToolError(f"--config {path}: {error} (a value in the record; fix or remove "
                        f"it there)") from None
    return {key: saved[key] if saved[key] is None else parsed[key] for key in saved}


def distillation_flags() -> set[str]:
    """The KD student's own flags: those the baseline student's parser lacks."""
    def options(stage):
        return {option for action in train_parser(stage)._actions
                for option in action.option_strings}
    return options("kd_student") - options("student")


def stage_flags(stage: str, flags: list[str]) -> list[str]:
    """The ``flags`` a stage takes: all for the KD student; for the teacher and the baseline
    student, all less the distillation ones and their values, so a baseline trains as its
    KD student does without the teacher (``--recipe transfer --unlabelled X`` included)."""
    if stage == "kd_student":
        return list(flags)
    kd_only, kept, skipping = distillation_flags(), [], False
    for token in flags:
        if token.startswith("--"):
            skipping = token.split("=")[0] in kd_only
        if not skipping:
            kept.append(token)
    return kept


def check_teaching_flags(args) -> None:
    """The KD student's flags that cannot go together, refused before any work (and by the
    runners before they train anything, a self-training baseline's flags included)."""
    if args.pseudo_teacher:
        if args.teacher_ckpt:
            raise ToolError("--pseudo-teacher replaces the HR teacher: give --teacher-ckpt "
                            "or --pseudo-teacher, not both")
        if args.lr_from_hr:
            raise ToolError("--lr-from-hr renders views for an HR teacher; a "
                            "--pseudo-teacher sees the LR views (drop one of them)")
    if args.teacher_cache and (args.mixup > 0 or args.cutmix > 0):
        raise ToolError("--teacher-cache keeps the teacher's logits of whole unmixed "
                        "images; with --mixup or --cutmix the teacher must see each "
                        "mixed view (drop --teacher-cache)")
    if args.teacher_cache and args.lr_from_hr:
        raise ToolError("--teacher-cache keeps the teacher's logits of the HR images as "
                        "they are; with --lr-from-hr the teacher must see each shifted "
                        "HR view (drop one of them)")


def check_stage_flags(stage: str, flags: list[str], what: str) -> None:
    """A runner's check, before it trains anything, that ``train_<stage>.py`` takes
    ``flags``; argparse's own error is printed above the one line naming ``what``. A runner
    scores every run on the split's test images, which ``--final-fit`` trains on: refused."""
    try:
        args = parse_train_arguments(stage, flags)
    except SystemExit:
        raise ToolError(f"{what} is not valid for train_{stage}.py (its error is above)") \
            from None
    if args.final_fit:
        raise ToolError(f"{what}: --final-fit trains on the split's test images, which the "
                        f"runner scores runs on; run train_*.py --final-fit yourself once the "
                        f"recipe is chosen")
    check_arguments(args)
    if stage == "kd_student":
        try:
            check_teaching_flags(args)
        except ToolError as error:
            raise ToolError(f"{what}: {error}") from None


def _preset_for(parser: argparse.ArgumentParser, stage: str, argv) -> dict:
    """The ``--recipe`` preset's settings that apply to this stage and these flags (for the
    KD student: to its ``--method``, see ``methods.preset_for_method``)."""
    first = parser.parse_args(argv)
    preset = recipe_defaults(first.recipe, {action.dest for action in parser._actions}, stage)
    if stage == "kd_student":
        preset = preset_for_method(preset, first.method)
    return preset


def replaced_preset_values(stage: str, argv) -> dict[str, tuple]:
    """The ``--recipe`` preset's values that flags given explicitly replace, as
    ``{option: (given value, preset's value)}``."""
    parser = train_parser(stage)
    preset, args = _preset_for(parser, stage, argv), parse_train_arguments(stage, argv)
    given = given_options(argv)
    return {action.option_strings[0]: (getattr(args, action.dest), preset[action.dest])
            for action in parser._actions
            if action.dest in preset and given & set(action.option_strings)
            and not _same_setting(action.dest, preset[action.dest], getattr(args, action.dest))}


def preset_overrides(stage: str, argv) -> list[str]:
    """One line per flag given explicitly that replaces a value of ``--config``'s saved run
    or of the ``--recipe`` preset."""
    parser = train_parser(stage)
    saved = config_defaults(parser, stage, argv)
    args = parse_train_arguments(stage, argv)
    given = given_options(argv)
    now = jsonable(args)
    lines = [f"note: {action.option_strings[0]} {now[action.dest]} replaces the saved run's "
             f"{saved[action.dest]} ({args.config})"
             for action in parser._actions
             if action.dest in saved and given & set(action.option_strings)
             and now[action.dest] != saved[action.dest]]
    if saved and "--recipe" not in given:
        return lines
    return lines + [f"note: {option} {value} replaces the {args.recipe} preset's {preset}"
                    for option, (value, preset) in replaced_preset_values(stage, argv).items()]


def _same_setting(dest: str, preset_value, value) -> bool:
    """Whether an explicit value is the preset's: a teacher's checkpoint named by its path
    is the preset's ``--weights teacher`` (the runners name the split's teacher so)."""
    if dest == "weights" and preset_value == "teacher" and value not in ("none", "imagenet"):
        return checkpoint_stage(value) == "teacher"
    return value == preset_value
