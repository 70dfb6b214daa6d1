"""Predict the unlabelled test.csv with a trained student, or an ensemble of several, and
write a submission file (ID,label, with the original label names, in test.csv's order);
or, with --images, predict any LR images: a folder, one image or a CSV of paths.

    python predict.py --stage kd_student --tta
    python predict.py --ckpt runs/kd_student/best.pt runs_seed1/kd_student/best.pt \
        runs/kd_student_final/best.pt --output ensemble.csv
    python predict.py --images photos/ --top-k 3 --probabilities --output photos.csv

With a <data-dir>/test_labels.csv (the data make_demo_data.py writes) it also prints the
submission's accuracy and macro-F1 against those labels. With --images, unreadable files
are listed and skipped, and the exit status is 1 if there were any.
"""
import argparse
import sys
from pathlib import Path

from src.cli import ToolError, ensure_writable_dir, pick_device, require_at_least_one, run_main, \
    write_csv
from src.predict import HOLDOUT_LABELS, holdout_scores, image_paths, load_students, \
    lr_size, predict_images, predict_test_set, read_holdout_labels
from src.arguments import common_arguments, given_options, read_run_record
from src.data import set_path_policy
from src.stages import cache_dir_for, runtime_for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--stage", choices=("student", "kd_student"), default="kd_student",
                        help="whose best checkpoint to use (<out-dir>/<stage>/best.pt)")
    parser.add_argument("--ckpt", type=Path, nargs="+", default=None, metavar="CKPT",
                        help="LR checkpoints of this tool instead of --stage's; with several, "
                             "their class probabilities are averaged (an ensemble of seeds, "
                             "students, final fits)")
    parser.add_argument("--config", type=Path, nargs="+", default=None, metavar="CONFIG",
                        help="RUN/config.json of trained students instead of --ckpt: each "
                             "run's best.pt, and the first run's --data-dir and --out-dir "
                             "(its image cache) unless given")
    parser.add_argument("--tta", action="store_true",
                        help="average the class probabilities of each image and its mirror")
    parser.add_argument("--output", type=Path, default=None,
                        help="submission file (default: submission.csv beside the checkpoint, "
                             "<out-dir>/<stage>/ without --ckpt; with several --ckpt, "
                             "<out-dir>/ensemble_submission.csv)")
    parser.add_argument("--images", type=Path, default=None, metavar="PATH",
                        help="predict these LR images instead of test.csv: a folder (its "
                             "image files, subfolders too), one image, or a CSV with an "
                             "img_path column; writes path,label rows (default output: "
                             "predictions.csv where the submission would go)")
    parser.add_argument("--top-k", type=int, default=1, metavar="K",
                        help="with --images: the K most probable classes per image, as "
                             "label, probability_1, label_2, probability_2, ...")
    parser.add_argument("--probabilities", action="store_true",
                        help="with --images: one column per class, p_<class>, its "
                             "probability (averaged over an ensemble and --tta)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output file")
    args = parser.parse_args()
    require_at_least_one({"--batch-size": args.batch_size, "--top-k": args.top_k})
    if args.images is None and (args.top_k != 1 or args.probabilities):
        raise ToolError("--top-k and --probabilities go with --images; the submission for "
                        "test.csv is ID,label")
    set_path_policy(args)
    if args.config and args.ckpt:
        raise ToolError("--config names the runs whose best.pt to use: give it or --ckpt")
    ckpts = args.ckpt or [args.out_dir / args.stage / "best.pt"]
    if args.config:
        records = [read_run_record(path, ("student", "kd_student"), "predict.py")
                   for path in args.config]
        ckpts = [path.parent / "best.pt" for path in args.config]
        given = given_options(sys.argv[1:])
        for flag in ("--data-dir", "--out-dir"):    # the run's data, its image cache
            dest = flag[2:].replace("-", "_")
            if flag not in given:
                setattr(args, dest, Path(records[0]["args"][dest]))
    if len(set(map(str, ckpts))) != len(ckpts):
        raise ToolError("--ckpt: each checkpoint once (a repeated one would weigh double)")
    name = "predictions.csv" if args.images else "submission.csv"
    output = args.output or (args.out_dir / f"ensemble_{name}" if len(ckpts) > 1
                             else ckpts[0].parent / name)
    if output.exists() and not args.overwrite:
        raise ToolError(f"{output} exists; pass --overwrite to replace it or --output elsewhere")
    ensure_writable_dir(output.parent, "--output folder")
    runtime = runtime_for(args, pick_device(args.device))
    if args.images:
        return predict_any_images(args, ckpts, output, runtime)
    # Data made by make_demo_data.py come with test.csv's labels: the submission is scored.
    holdout = read_holdout_labels(args.data_dir)
    submission = predict_test_set(args.data_dir, ckpts, cache_dir_for(args), args.batch_size,
                                  runtime, args.tta)
    write_csv(output, submission)
    counts = submission["label"].value_counts()
    print(f"{len(submission)} predictions ({len(counts)} distinct labels"
          f"{', with flip TTA' if args.tta else ''}) from {_used(ckpts)} -> {output}")
    if holdout is not None:
        scores = holdout_scores(submission, holdout, output)
        print(f"held-out ({HOLDOUT_LABELS}): accuracy {100 * scores['accuracy']:.2f}%  "
              f"macro-F1 {100 * scores['macro_f1']:.2f}%  (n={len(holdout)})")
    return 0


def predict_any_images(args, ckpts: list[Path], output: Path, runtime) -> int:
    paths = image_paths(args.images)         # a wrong path is named before any loading
    members = load_students(ckpts)
    classes = members[0][2]["classes"]
    if args.top_k > len(classes):
        raise ToolError(f"--top-k {args.top_k} is more than the {len(classes)} classes of "
                        f"{ckpts[0]}")
    predictions, unreadable, resized = predict_images(members, paths, args.batch_size,
                                                      runtime, args.tta, args.top_k,
                                                      args.probabilities)
    write_csv(output, predictions)
    size = lr_size(members[0][2])
    print(f"{len(predictions)} of {len(paths)} images predicted"
          f"{' with flip TTA' if args.tta else ''} by {_used(ckpts)} -> {output}")
    if resized:
        print(f"{resized} images were not {size}x{size}, the checkpoint's LR size: resized "
              f"to it (box filter when shrinking, bicubic when growing; aspect not kept)")
    if unreadable:
        for line in unreadable:
            print(f"skipped: {line}", file=sys.stderr)
        print(f"{len(unreadable)} of {len(paths)} images unreadable, skipped (listed above); "
              f"the others' predictions are in {output}", file=sys.stderr)
        return 1
    return 0


def _used(ckpts: list[Path]) -> str:
    return (f"the mean probabilities of {len(ckpts)} checkpoints: {', '.join(map(str, ckpts))}"
            if len(ckpts) > 1 else str(ckpts[0]))


if __name__ == "__main__":
    run_main(main)
