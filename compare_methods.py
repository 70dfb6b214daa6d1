"""Compare distillation methods: one KD student per method, trained with the baseline
student's settings (split, seed, epochs, architecture) and the run folder's teacher, then
tested; prints method, test accuracy, macro-F1, difference from the baseline, s/epoch.

    python compare_methods.py --methods kd dkd at cwd mgd amd kd+at
"""
import argparse
import sys
from pathlib import Path

from src.cli import run_main, split_passthrough
from src.methods import compare_methods


def main() -> int:
    # The baseline's settings are copied to every method: overriding them would break the
    # like-for-like comparison.
    argv, train_args = split_passthrough(
        sys.argv[1:], {"--seed", "--epochs", "--arch", "--out-dir", "--data-dir", "--method",
                       "--teacher-ckpt", "--resume", "--overwrite", "--lr", "--batch-size",
                       "--input-size", "--weights"}, "compare_methods.py")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] [-- train_kd_student options]",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="folder holding train.csv and the images")
    parser.add_argument("--out-dir", type=Path, default=Path("runs"),
                        help="run folder with a trained teacher and a tested baseline student; "
                             "methods go to <out-dir>/methods/<method>/")
    parser.add_argument("--methods", nargs="+",
                        default=["kd", "dkd", "at", "cwd", "mgd", "amd", "kd+at"],
                        help="methods to compare (see train_kd_student.py --help)")
    args = parser.parse_args(argv)
    compare_methods(args.data_dir, args.out_dir, args.methods, train_args)
    return 0


if __name__ == "__main__":
    run_main(main)
