"""Compare distillation recipes, each against its own baseline, over several seeds on one
split and one teacher (or several, averaged): mean ± std, paired 95% intervals of KD -
baseline, share of the teacher-baseline gap closed, per-seed figures and wall-clock.

A recipe is a preset (reference, consistent) or NAME=FLAGS for train_kd_student.py; its
baseline student trains with the same flags less the distillation ones. Flags after --
go to every run. Runs live in <out-dir>/recipes/<recipe>/seed<k>/; rerunning keeps
finished ones. Needs <out-dir>/teacher/best.pt (train_teacher.py, which also makes the
split: give it --split-per-class N for a balanced subset of large data).

    python compare_recipes.py --recipes reference consistent --seeds 0 1 2 -- --epochs 30
    python compare_recipes.py --recipes reference 'mine=--method METHOD' 'hot=--temperature 8'
    python compare_recipes.py --recipes consistent \
        'transfer=--recipe transfer --unlabelled data/unlabelled.csv' -- --epochs 30
    python compare_recipes.py --recipes consistent --teacher-ckpt runs/teacher/best.pt \
        runs_seed1/teacher/best.pt runs_seed2/teacher/best.pt -- --epochs 30
"""
import argparse
import sys
from pathlib import Path

from src.cli import ToolError, require_at_least_one, \
    require_at_least_zero, run_main, split_passthrough
from src.arguments import config_flags
from src.compare import compare_recipes
from src.seeds import add_processes_argument
from src.recipes import NEEDS_UNLABELLED, RECIPES


def main() -> int:
    argv, common = split_passthrough(
        sys.argv[1:], {"--seed", "--out-dir", "--data-dir", "--resume", "--overwrite",
                       "--teacher-ckpt", "--teacher-weights", "--split-per-class"},
        "compare_recipes.py")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] [-- options for every train script]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="folder holding train.csv and the images")
    parser.add_argument("--out-dir", type=Path, default=Path("runs"),
                        help="run folder with split.csv and the trained teacher; recipes go to "
                             "<out-dir>/recipes/")
    parser.add_argument("--recipes", nargs="+",
                        default=[name for name in RECIPES if name not in NEEDS_UNLABELLED],
                        help="presets (" + ", ".join(RECIPES) + ") or NAME=FLAGS, e.g. "
                             "'mine=--method METHOD' (train_kd_student.py --help lists the "
                             "methods); a preset named alone keeps its own settings over the "
                             "flags after -- (saying so), so that it is compared as "
                             "it is: tune one with NAME=--recipe PRESET FLAGS; a recipe with "
                             "--unlabelled also gets a "
                             "self-training baseline (the same images labelled by the seed's "
                             "own LR baseline, no HR teacher); {seed} in FLAGS is the seed "
                             "('round2=--recipe consistent --pseudo-teacher "
                             "runs/recipes/transfer/seed{seed}/kd_student/best.pt "
                             "--unlabelled data/test.csv')")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds (initialisation, data order, augmentation); the "
                             "split stays the one in <out-dir>")
    parser.add_argument("--versus", default=None, metavar="RECIPE",
                        help="also compare every KD student with this recipe's baseline "
                             "(default: the first of --recipes), e.g. a plain baseline against "
                             "teacher-initialised recipes")
    parser.add_argument("--teacher-ckpt", type=Path, nargs="+", default=None, metavar="CKPT",
                        help="the HR teacher(s) every KD student learns from (None: "
                             "<out-dir>/teacher/best.pt); with several, soft targets and the "
                             "teacher's score (the gap's top) are their averaged probabilities; "
                             "--weights teacher starts from the first")
    parser.add_argument("--teacher-weights", type=float, nargs="+", default=None, metavar="W",
                        help="one weight per --teacher-ckpt for the average (None: equal)")
    parser.add_argument("--resamples", type=int, default=10_000,
                        help="bootstrap resamples of the test images for the paired interval")
    parser.add_argument("--config", type=Path, default=None,
                        help="RUN/config.json of an earlier run: its training settings are "
                             "the shared train-script flags (those after -- win); the data, "
                             "folders, seeds and teacher stay this command's")
    add_processes_argument(parser)
    args = parser.parse_args(argv)
    if args.config:
        common = [*config_flags(args.config, "compare_recipes.py"), *common]
        print(f"settings from {args.config}: {' '.join(common)}")
    require_at_least_one({"--resamples": args.resamples, "--nproc-per-node": args.nproc_per_node})
    require_at_least_zero({"--seeds": args.seeds, "--teacher-weights": args.teacher_weights})
    if len(set(args.seeds)) != len(args.seeds):
        raise ToolError("--seeds has duplicates")
    compare_recipes(args.data_dir, args.out_dir, args.recipes, args.seeds, common,
                    args.resamples, args.versus, args.nproc_per_node, args.teacher_ckpt,
                    args.teacher_weights)
    return 0


if __name__ == "__main__":
    run_main(main)
