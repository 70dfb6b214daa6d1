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
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .arguments import STAGES, check_arguments, check_teaching_flags, figures_dir, jsonable, \
    parse_train_arguments, preset_overrides, test_parser
from . import distributed
from .cli import ToolError, ensure_writable_dir, load_torch, pick_device, read_json, \
    run_record, save_torch, write_csv, write_json
from .backbones import is_transformer, library_of, library_version
from .data import ImageSet, load_or_create_split, pair_scale
from .lr_render import LR_RENDER_TOLERANCE, lr_render_error
from .distill import Distiller, HardLabels
from .methods import hard_label_weight, method_settings
from .models import build_model, load_checkpoint, load_teacher
from .comparison import compare_stages
from .runlock import stage_lock
from .tracking import Trackers, require_trackers
from .trainer import FitConfig, Runtime, evaluate, fit, run_status
from .transfer import add_unlabelled, labelled_sizes, primary_resolution, read_unlabelled

# Arguments that may differ between a run and its --resume.
RESUME_FREE = {"resume", "overwrite", "config", "tensorboard", "wandb", "wandb_project",
               "device", "compile", "cache_dir", "no_cache", "sync_bn"}


# --- training --------------------------------------------------------------------------


def cache_dir_for(args) -> Path | None:
    if args.no_cache:
        return None
    return ensure_writable_dir(args.cache_dir or Path(args.out_dir) / "cache", "--cache-dir")


def runtime_for(args, device: torch.device, deterministic: bool = False) -> Runtime:
    """Every setting in which a CUDA run differs from a CPU one is decided here or where
    the tensors live, and each runs in a CPU test unless it cannot:
        --amp (bf16 autocast), --channels-last   auto = on with CUDA; both run on the CPU
                                                 with "on" (tests/test_distributed.py)
        cuDNN benchmark / deterministic flags    set here; only cuDNN reads them
        float views                              make_view resizes floats on an
                                                 accelerator, uint8 on the CPU; the float
                                                 path is compared on CPU tensors
        pinned memory, non-blocking copies       data.iterate_batches on CUDA; pinning
                                                 needs an accelerator, the copy runs anyway
        --compile                                torch.compile; runs on the CPU in a test
        NCCL, SyncBatchNorm, DDP device_ids      distributed.py; gloo runs them on the CPU,
                                                 SyncBatchNorm is refused there
    """
    cuda = device.type == "cuda"
    choose = lambda setting: cuda if setting == "auto" else setting == "on"  # noqa: E731
    if deterministic:
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = cuda and not deterministic
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
    if args.overwrite and not _made_by_this_tool(stage_dir):
        raise ToolError(f"--overwrite: {stage_dir} holds files this tool did not write (no "
                        f"run record config.json); nothing deleted: move them or use another "
                        f"--out-dir")
    # With --overwrite the old run is deleted only once every input has loaded
    # (_clear_for_overwrite), so a bad input never costs the earlier results.
    return "none" if args.overwrite else status


def _made_by_this_tool(stage_dir: Path) -> bool:
    """Whether --overwrite may delete ``stage_dir``: missing or empty, or a run folder of
    this tool (its config.json is a run record). Anything else may be a user's own folder
    that happens to carry a stage's name."""
    if not stage_dir.exists():
        return True
    if not stage_dir.is_dir():
        return False
    if not any(stage_dir.iterdir()):
        return True
    try:
        record = json.loads((stage_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"args", "command", "versions"} <= record.keys()


def _clear_for_overwrite(stage_dir: Path, args) -> None:
    if args.overwrite and stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)


# Settings naming files: compared as absolute paths, so `runs/x` and `./runs/x` agree.
PATH_SETTINGS = {"data_dir", "out_dir", "teacher_ckpt", "weights"}


def settings_differences(saved: dict, wanted: dict, stage: str) -> list[str]:
    """The training settings (all but RESUME_FREE) in which a saved run's ``args`` differ
    from the ones wanted now, as ``--flag saved -> wanted``. A flag the saved run does not
    record was added later: it trained as the flag's default does (a new flag's default
    keeps the old behaviour), so it is compared as that default."""
    defaults = jsonable(parse_train_arguments(stage, []))
    saved = {**{key: defaults.get(key) for key in wanted}, **saved}

    def normal(key, value):
        if key not in PATH_SETTINGS or value is None:
            return value
        return [os.path.abspath(item) for item in value] if isinstance(value, list) \
            else os.path.abspath(value)
    return [f"--{key.replace('_', '-')} {saved[key]!r} -> {value!r}"
            for key, value in wanted.items()
            if key not in RESUME_FREE and normal(key, saved[key]) != normal(key, value)]


def _check_resume_settings(stage_dir: Path, stage: str, args_dict: dict,
                           finished: bool = False) -> dict:
    config = read_json(stage_dir / "config.json")
    differences = settings_differences(config.get("args", {}), args_dict, stage)
    if differences:
        how = (f"the run is finished; to train it further start a new one from its weights "
               f"(--weights {stage_dir / 'best.pt'} --out-dir NEW: a fresh optimizer and "
               f"schedule), or use --overwrite" if finished else
               "resume with the saved settings or use --overwrite")
        raise ToolError(f"--resume with other settings than the saved run "
                        f"({'; '.join(differences)}); {how}")
    return config


def check_kept_run(stage_dir: Path, stage: str, argv: list[str]) -> None:
    """A finished run that a runner (compare_recipes, run_seeds) keeps instead of training
    again must have been trained with the settings asked for now: otherwise a comparison
    would silently mix budgets, teachers or recipes."""
    wanted = jsonable(resolve_train_arguments(stage, argv))
    wanted.pop("out_dir")          # where the run lives now; a copied or moved run is kept
    differences = settings_differences(read_json(stage_dir / "config.json").get("args", {}),
                                       wanted, stage)
    if differences:
        raise ToolError(f"{stage_dir} holds a finished run trained with other settings "
                        f"({'; '.join(differences)}); delete it or use another --out-dir")


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


def with_teacher_weights(stage: str, flags: list[str], teacher: Path) -> list[str]:
    """``flags`` for a runner's stage folder: where they say ``--weights teacher`` (as a
    flag, or through a preset such as teacher-init), the split's teacher file is named
    explicitly, since the folder holds no teacher of its own."""
    if stage != "teacher" and parse_train_arguments(stage, flags).weights == "teacher":
        return [*flags, "--weights", str(teacher)]
    return flags


def resolve_train_arguments(stage: str, argv) -> argparse.Namespace:
    """A train script's settings as its run records them: parsed with the recipe's
    defaults, checked, and the defaults that depend on other flags filled in."""
    args = parse_train_arguments(stage, argv)
    check_arguments(args)
    if stage == "kd_student":
        check_teaching_flags(args)
        if not args.pseudo_teacher:
            args.teacher_ckpt = args.teacher_ckpt or [Path(args.out_dir) / "teacher" / "best.pt"]
        if args.alpha is None:
            args.alpha = hard_label_weight(args.method)
    resolve_init_weights(args, Path(args.out_dir))
    return args


def train_main(stage: str, argv=None) -> int:
    args = resolve_train_arguments(stage, argv)
    require_trackers(args)
    for line in preset_overrides(stage, sys.argv[1:] if argv is None else argv):
        print(line)
    out_dir = ensure_writable_dir(args.out_dir)
    # A final fit is its own run beside the split's, never mistaken for it by the test
    # scripts, the runners or a KD student's default teacher.
    stage_dir = out_dir / (f"{stage}_final" if args.final_fit else stage)
    # Rank 0 of a torchrun job removes the lock the whole job holds.
    with stage_lock(stage_dir, release_it=int(os.environ.get("RANK", "0")) == 0):
        return _train_stage(stage, args, out_dir, stage_dir)


def _train_stage(stage: str, args, out_dir: Path, stage_dir: Path) -> int:
    """The train script's steps, in order: a finished run or the resume check; processes
    and seeds; the split; the teachers (checked before the slow image decoding); the
    model; the images; the objective; the record; training."""
    args_dict = jsonable(args)
    if _prepare_stage_dir(stage_dir, args) == "finished":  # only reachable with --resume
        # Another --epochs (a longer budget) is refused like any other setting, with the
        # way to go on: a finished schedule cannot be stretched after the fact.
        # Where the run lives now is not a setting: a moved or copied run is the same run.
        _check_resume_settings(stage_dir, stage,
                               {key: value for key, value in args_dict.items()
                                if key != "out_dir"}, finished=True)
        print(f"{stage_dir} holds a finished run; nothing to resume "
              f"(use --overwrite to train again)")
        return 0
    config = _check_resume_settings(stage_dir, stage, args_dict) if args.resume else None
    device, context, runtime = _start(args)
    with distributed.main_process_first():
        split = load_or_create_split(args.data_dir, out_dir, args.seed,
                                     per_class=args.split_per_class)
    _check_init_weights(args, split)
    if args.final_fit:
        split = split.all_for_training()
    teachers = _load_teachers(args, split) if stage == "kd_student" else Teachers()
    model = _build_student(args, split)
    data = _load_data(stage, args, split, teachers, context, runtime)
    if config is not None:
        _check_same_transfer_set(config, data, stage_dir)
    objective = _build_objective(stage, args, model, teachers, data, device, runtime)
    if context.is_main:
        _clear_for_overwrite(stage_dir, args)
    record = _stage_record(stage, args, args_dict, config, device, context, split, teachers,
                           data)
    if context.is_main:
        write_json(stage_dir / "config.json", record)
    print(_run_line(stage, args, split, data, teachers, device, context))
    meta = {"stage": stage, "arch": args.arch, "library": library_of(args.arch),
            "library_version": library_version(args.arch), "classes": split.classes,
            "resolution": STAGES[stage]["resolution"], "input_size": args.input_size,
            "image_size": data.images.image_size(STAGES[stage]["resolution"]),
            "seed": args.seed, "split_fingerprint": split.fingerprint,
            "final_fit": bool(args.final_fit)}
    trackers = Trackers(args, stage_dir, f"{out_dir.name}/{stage_dir.name}", record, "train",
                        enabled=context.is_main)
    try:
        summary = fit(objective, data.images, _fit_config(args, runtime, data), stage_dir,
                      runtime, meta, resume=args.resume, on_epoch=trackers.log_epoch)
    finally:
        trackers.close()
        distributed.teardown()
    print(f"done: best epoch {summary['best_epoch']} of {summary['epochs_run']} "
          f"({summary['train_seconds']:.0f}s) -> {stage_dir / 'best.pt'}")
    return 0


def _start(args) -> tuple[torch.device, distributed.Context, Runtime]:
    """The device and (under torchrun) the process group; seeds; the runtime settings."""
    device = distributed.setup(args.device, args.sync_bn)
    context = distributed.current()
    if args.batch_size < 2 * context.world_size:
        raise ToolError(f"--batch-size {args.batch_size} is the global batch: it must give "
                        f"each of the {context.world_size} processes at least 2 images")
    # Every process starts from the same weights (DDP also checks that).
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    return device, context, runtime_for(args, device, args.deterministic)


@dataclass
class Teachers:
    """The KD student's frozen teachers: HR teachers, or LR pseudo-teachers."""
    models: list = field(default_factory=list)
    metas: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    resolution: str | None = None


def _load_teachers(args, split) -> Teachers:
    resolution = "lr" if args.pseudo_teacher else "hr"
    teachers = Teachers(resolution=resolution,
                        checkpoints=list(args.pseudo_teacher or args.teacher_ckpt))
    what = "teacher checkpoint" if resolution == "hr" else "--pseudo-teacher checkpoint"
    for ckpt in teachers.checkpoints:
        teacher, meta = load_teacher(ckpt, split.classes, resolution)
        check_same_split(what, ckpt, meta, split, final_fit=args.final_fit)
        teachers.models.append(teacher)
        teachers.metas.append(meta)
    return teachers


def is_final_fit(ckpt: Path, meta: dict) -> bool:
    """Whether the checkpoint is a ``--final-fit`` (trained on every labelled row): marked
    in its meta, or for one saved before the mark, in the run record beside it."""
    if "final_fit" in meta:
        return bool(meta["final_fit"])
    try:
        return bool(json.loads((Path(ckpt).parent / "config.json").read_text())
                    ["args"].get("final_fit"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def check_same_split(what: str, ckpt: Path, meta: dict, split, final_fit: bool) -> None:
    """A model another stage builds on (a teacher, ``--weights teacher``) must have been
    trained on this very split, and be a final fit only for a final fit: otherwise it has
    seen images the new model is selected or scored on."""
    theirs = meta.get("split_fingerprint")
    if theirs == split.data_fingerprint and theirs != split.fingerprint:
        print(f"note: {what} {ckpt} was saved before splits recorded which rows went where; "
              f"it was trained on these rows, but whether on this very split cannot be checked")
    elif theirs != split.fingerprint:
        raise ToolError(f"{what} {ckpt} was trained on another split than this --out-dir's "
                        f"split.csv (another --seed, --split-per-class or data), so it may have "
                        f"trained on this split's validation and test images; train it in "
                        f"this --out-dir")
    if is_final_fit(ckpt, meta) and not final_fit:
        raise ToolError(f"{what} {ckpt} is a final fit: it trained on this split's validation "
                        f"and test images, which this run is selected and scored on; use the "
                        f"split's own run, or --final-fit this one too")


def _check_init_weights(args, split) -> None:
    """``--weights`` from a model this tool trained on these classes (``--weights teacher``
    and its like): of this very split, like a teacher. A file from other data is a
    pretrained start, not checked."""
    if args.weights in ("imagenet", "none"):
        return
    meta = load_torch(args.weights, "--weights")
    if isinstance(meta, dict) and "split_fingerprint" in meta \
            and list(meta.get("classes", [])) == list(split.classes):
        check_same_split("--weights", args.weights, meta, split, final_fit=args.final_fit)


def _build_student(args, split) -> torch.nn.Module:
    model = build_model(args.arch, len(split.classes), args.weights, args.input_size,
                        partial=args.partial_weights)
    if args.layer_decay is None:
        # BEiT-style fine-tuning for pretrained transformers; a CNN or a model trained from
        # scratch learns every layer at the full rate.
        args.layer_decay = 0.75 if args.weights == "imagenet" and is_transformer(model) else 1.0
    return model


@dataclass
class StageData:
    images: ImageSet
    view_sizes: dict
    unlabelled: dict | None = None      # what the transfer set holds, for the record
    teacher_logits: torch.Tensor | None = None    # --teacher-cache
    lr_from_hr: int = 0                 # --lr-from-hr's HR/LR factor


def _load_data(stage: str, args, split, teachers: Teachers, context, runtime) -> StageData:
    """The training images at each resolution the stage needs (and the transfer set's),
    from the decoded-image cache; with --teacher-cache, the teacher's logits instead of HR
    images."""
    view_sizes = {STAGES[stage]["resolution"]: args.input_size}
    if teachers.resolution == "hr":
        view_sizes["hr"] = int(teachers.metas[0]["input_size"])
    cache_dir = cache_dir_for(args)
    source = read_unlabelled(args.unlabelled, *labelled_sizes(split, args.data_dir),
                             needs_hr=teachers.resolution == "hr") \
        if getattr(args, "unlabelled", None) else None
    load = lambda resolutions: load_training_images(  # noqa: E731
        split, args, resolutions, source, cache_dir, memory_map=context.enabled)
    teacher_logits = None
    # Rank 0 decodes the images (and computes the cached teacher logits) into the cache;
    # the other processes then read the same files, memory-mapped.
    with distributed.main_process_first():
        if stage == "kd_student" and args.teacher_cache:
            if len(teachers.models) > 1:
                raise ToolError("--teacher-cache takes one teacher checkpoint")
            teacher_logits = _teacher_logits(teachers.models[0], teachers.metas[0],
                                             teachers.checkpoints[0], teachers.resolution,
                                             split, source, args, load, cache_dir, runtime)
            view_sizes.pop("hr", None)    # the student alone needs images from here on
        images, unlabelled = load(sorted(view_sizes))
    lr_from_hr = _lr_render_scale(images) if getattr(args, "lr_from_hr", False) else 0
    return StageData(images, view_sizes, unlabelled, teacher_logits, lr_from_hr)


def _build_objective(stage: str, args, model, teachers: Teachers, data: StageData, device,
                     runtime):
    if stage == "kd_student":
        objective = Distiller(model, [] if data.teacher_logits is not None else teachers.models,
                              args.method, vars(args),
                              [int(meta["input_size"]) for meta in teachers.metas],
                              cached_teacher_logits=data.teacher_logits,
                              probe_size=args.input_size,
                              teacher_resolution=teachers.resolution)
    else:
        objective = HardLabels(model, STAGES[stage]["resolution"])
    objective.to(device)
    if runtime.channels_last:
        objective.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile()
    return objective


def _stage_record(stage: str, args, args_dict: dict, config: dict | None, device, context,
                  split, teachers: Teachers, data: StageData) -> dict:
    """What config.json says of the run: its settings, and what they resolved to."""
    record = run_record(args_dict, {
        "stage": stage, "device": _device_name(device),
        "split": {"seed": split.seed, "fingerprint": split.fingerprint,
                  "classes": len(split.classes)},
        "image_sizes": {key: data.images.image_size(key) for key in data.images.pixels},
        "teacher": {"checkpoints": [str(ckpt) for ckpt in teachers.checkpoints],
                    "resolution": teachers.resolution,
                    "archs": [meta["arch"] for meta in teachers.metas],
                    "input_sizes": [meta["input_size"] for meta in teachers.metas],
                    "method": args.method,
                    "method_settings": method_settings(args.method, vars(args)),
                    "mode": "cached logits" if data.teacher_logits is not None
                    else "online, paired views"} if teachers.metas else None,
        "unlabelled": data.unlabelled,
    })
    if config is not None:
        record["resumed"] = config.get("resumed", []) + [record.pop("command")]
        record["command"] = config.get("command")
    record["processes"] = context.world_size
    record["layer_decay"] = args.layer_decay
    record["versions"][library_of(args.arch)] = library_version(args.arch)
    return record


def _run_line(stage: str, args, split, data: StageData, teachers: Teachers, device,
              context) -> str:
    resolution = STAGES[stage]["resolution"]
    unlabelled = data.unlabelled
    start = {"none": "from scratch", "imagenet": "from ImageNet weights"}.get(
        args.weights, f"from {args.weights}")
    return (f"{STAGES[stage]['title']}: {args.arch} {start} on "
            f"{resolution.upper()} {data.images.image_size(resolution)}px -> "
            f"{args.input_size}px, {len(split.indices('train'))} train / "
            f"{len(split.indices('val'))} val images"
            + (" (final fit: every labelled image)" if args.final_fit else "") + ", "
            + (f"{unlabelled['used']} unlabelled ({args.unlabelled_ratio:g} per labelled "
               f"image in a batch), " if unlabelled else "")
            + (f"layer-wise lr decay {args.layer_decay:g}, " if args.layer_decay != 1 else "")
            + f"{_device_name(device)}"
            + (f", {context.world_size} processes (torchrun), global batch {args.batch_size}"
               if context.enabled else "")
            + (_teaching_line(args, teachers) if teachers.checkpoints else ""))


def _teaching_line(args, teachers: Teachers) -> str:
    """What the KD student learns from, and with what weights: the teacher files, the
    method with its settings, alpha (the cross-entropy's weight)."""
    settings = "; ".join(
        f"{name} " + ", ".join(f"{key} {value:g}" if isinstance(value, (int, float))
                               else f"{key} {value}" for key, value in values.items())
        for name, values in method_settings(args.method, vars(args)).items())
    who = "pseudo-teacher" if teachers.resolution == "lr" else "teacher"
    return (f"\n  taught by {who} {', '.join(map(str, teachers.checkpoints))}: method "
            f"{settings}, alpha {args.alpha:g} (cross-entropy)")


def _check_same_transfer_set(config: dict, data: StageData, stage_dir: Path) -> None:
    """--resume: the unlabelled images must be the ones the run started with, by content
    (the path alone, compared with the other settings, misses files replaced in place)."""
    saved = (config.get("unlabelled") or {}).get("fingerprint")
    now = (data.unlabelled or {}).get("fingerprint")
    if saved and now and saved != now:
        raise ToolError(f"--resume: the unlabelled images changed since {stage_dir} started "
                        f"(same paths, other contents); resume with the original images or "
                        f"use --overwrite")


def _fit_config(args, runtime, data: StageData) -> FitConfig:
    return FitConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, lr_factor=args.lr_factor, lr_patience=args.lr_patience,
        min_lr=args.min_lr, patience=args.patience, monitor=args.monitor, hflip=args.hflip,
        crop_scale=args.crop_scale, seed=args.seed, amp=runtime.amp,
        channels_last=runtime.channels_last, view_sizes=data.view_sizes,
        schedule=args.schedule, warmup_epochs=args.warmup_epochs, mixup=args.mixup,
        cutmix=args.cutmix, sync_bn=args.sync_bn, layer_decay=args.layer_decay,
        lr_from_hr=data.lr_from_hr,
        unlabelled_ratio=args.unlabelled_ratio if data.unlabelled else 0.0)


def _lr_render_scale(images: ImageSet) -> int:
    """The HR/LR factor for ``--lr-from-hr``, once the LR images are checked to be their HR
    twins box-filtered (else the rendered views would not look like the LR images)."""
    scale = pair_scale(images.pixels["lr"].shape[1:3], images.pixels["hr"].shape[1:3])
    error = lr_render_error(images, scale)
    if error > LR_RENDER_TOLERANCE:
        raise ToolError(f"--lr-from-hr: the LR images differ from their HR twins box-filtered "
                        f"by {scale} by {error:.1f} grey levels on average (at most "
                        f"{LR_RENDER_TOLERANCE} allowed): they were made another way, so "
                        f"rendered LR views would not look like them; drop --lr-from-hr")
    return scale


def load_training_images(split, args, resolutions, source, cache_dir: Path | None,
                         memory_map: bool = False):
    """The split's images at ``resolutions`` and, with an unlabelled ``source``, its rows
    after them (``transfer.add_unlabelled``); returns the ImageSet and what was done with
    the unlabelled images (None without). Labelled HR images are also read when unlabelled
    HR images need an LR twin: the degradation is measured on the labelled pairs."""
    load = set(resolutions)
    if source is not None:
        load.add(primary_resolution(source))     # the leakage check compares these
        if "lr" in load and "lr" not in source.paths:
            load |= {"lr", "hr"}
    images = ImageSet.load(split, args.data_dir, sorted(load), cache_dir,
                           memory_map=memory_map)
    if source is None:
        return images, None
    return add_unlabelled(images, source, resolutions, args.degradation, cache_dir)


def _teacher_logits(teacher, teacher_meta: dict, teacher_ckpt: Path, resolution: str, split,
                    source, args, load, cache_dir: Path | None, runtime: Runtime):
    """The teacher's logits for every row of the split and of the unlabelled set (whole
    un-augmented images at the teacher's ``resolution``), kept in the cache keyed by the
    teacher checkpoint's bytes, the split and the unlabelled images."""
    digest = hashlib.sha256(Path(teacher_ckpt).read_bytes())
    digest.update(split.fingerprint.encode())
    if source is not None:
        # The images' contents, not their names: files replaced under the same names
        # must not be given the old images' logits.
        digest.update(json.dumps([source.fingerprint, args.degradation,
                                  resolution]).encode())
    cache_file = cache_dir / f"teacher-logits-{digest.hexdigest()[:16]}.pt" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        print(f"teacher logits from {cache_file}")
        return load_torch(cache_file, "teacher logits cache")
    images, _ = load([resolution])
    result = evaluate(HardLabels(teacher, resolution).to(runtime.device), images,
                      np.arange(len(images.labels)), {resolution: int(teacher_meta["input_size"])},
                      args.batch_size, runtime, description="teacher logits")
    teacher.cpu()
    if cache_file is not None:
        save_torch(cache_file, result["logits"])
        print(f"cached teacher logits for {len(images.labels)} images -> {cache_file}")
    return result["logits"]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


# --- testing ---------------------------------------------------------------------------

def test_main(stage: str, argv=None) -> int:
    args = test_parser(stage).parse_args(argv)
    check_arguments(args)
    require_trackers(args)
    split = load_saved_split(args.data_dir, args.out_dir)
    metrics = test_stage(stage, split, args, args.ckpt)
    comparison = compare_stages(args.out_dir, figures_dir(args))
    trackers = Trackers(args, Path(args.out_dir) / stage,
                        f"{Path(args.out_dir).name}/{stage} test",
                        read_json(Path(args.out_dir) / stage / "test_metrics.json"), "test")
    try:
        trackers.log_scalars({f"test_{key}": metrics[key]
                              for key in ("accuracy", "macro_f1", "loss")}, 0)
        trackers.log_images(comparison["figures"] if comparison else [])
    finally:
        trackers.close()
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
    if is_final_fit(ckpt, meta):
        raise ToolError(f"{stage} checkpoint {ckpt} is a final fit: it trained on the split's "
                        f"test images, so a test score would count images it learned; score "
                        f"the split's own run ({stage_dir / 'best.pt'}), and use predict.py for "
                        f"test.csv")
    check_same_split(f"{stage} checkpoint", ckpt, meta, split, final_fit=False)
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
    print(f"{STAGES[stage]['title']} ({meta['arch']}): test accuracy "
          f"{100 * metrics['accuracy']:.2f}%  "
          f"macro-F1 {100 * metrics['macro_f1']:.2f}%  (n={metrics['n']}) "
          f"-> {stage_dir / 'test_metrics.json'}")
    return {**metrics, "logits": result["logits"], "labels": result["labels"],
            "features": result.get("features"), "test_index": test_idx}
