"""Predict the unlabelled test.csv with a trained student, or an ensemble of several, and
write a submission file (ID,label, with the original label names, in test.csv's order).

    python predict.py --stage kd_student --tta
    python predict.py --ckpt runs/kd_student/best.pt runs_seed1/kd_student/best.pt \
        runs/kd_student_final/best.pt --output ensemble.csv

With a <data-dir>/test_labels.csv (the data make_demo_data.py writes) it also prints the
submission's accuracy and macro-F1 against those labels.
"""
import argparse
import sys
from pathlib import Path

from src.cli import ToolError, ensure_writable_dir, pick_device, require_at_least_one, run_main, \
    write_csv
from src.predict import HOLDOUT_LABELS, holdout_scores, predict_test_set, \
    read_holdout_labels
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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing submission file")
    args = parser.parse_args()
    require_at_least_one({"--batch-size": args.batch_size})
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
    output = args.output or (args.out_dir / "ensemble_submission.csv" if len(ckpts) > 1
                             else ckpts[0].parent / "submission.csv")
    if output.exists() and not args.overwrite:
        raise ToolError(f"{output} exists; pass --overwrite to replace it or --output elsewhere")
    ensure_writable_dir(output.parent, "--output folder")
    # Data made by make_demo_data.py come with test.csv's labels: the submission is scored.
    holdout = read_holdout_labels(args.data_dir)
    runtime = runtime_for(args, pick_device(args.device))
    submission = predict_test_set(args.data_dir, ckpts, cache_dir_for(args), args.batch_size,
                                  runtime, args.tta)
    write_csv(output, submission)
    counts = submission["label"].value_counts()
    used = (f"the mean probabilities of {len(ckpts)} checkpoints: "
            f"{', '.join(map(str, ckpts))}" if len(ckpts) > 1 else f"{ckpts[0]}")
    print(f"{len(submission)} predictions ({len(counts)} distinct labels"
          f"{', with flip TTA' if args.tta else ''}) from {used} -> {output}")
    if holdout is not None:
        scores = holdout_scores(submission, holdout, output)
        print(f"held-out ({HOLDOUT_LABELS}): accuracy {100 * scores['accuracy']:.2f}%  "
              f"macro-F1 {100 * scores['macro_f1']:.2f}%  (n={len(holdout)})")
    return 0


if __name__ == "__main__":
    run_main(main)
