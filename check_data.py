"""Inspect a dataset in the DACON layout before training: rows, images per class, image
sizes, how the LR images were made from their HR twins (the degradation), and every missing
or unreadable file, mismatched LR/HR pair or label problem; with --unlabelled, a transfer
set's images too.
Exits 1 when it finds a problem, 2 when the layout itself is broken.

    python check_data.py --data-dir data
"""
import argparse
from pathlib import Path

from src.checks import check_dataset, print_report
from src.cli import require_at_least_zero, run_main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="folder holding train.csv, test.csv, train/, upscale_train/, test/")
    parser.add_argument("--pair-tolerance", type=float, default=16.0,
                        help="largest mean difference, in grey levels, between an LR image and "
                             "its HR twin shrunk to LR size before the pair is reported as two "
                             "different samples")
    parser.add_argument("--unlabelled", type=Path, default=None, metavar="PATH",
                        help="also check a transfer set for train_kd_student.py --unlabelled "
                             "(a folder of images or a CSV): every file readable, of the "
                             "labelled images' size, and how many equal a labelled image")
    args = parser.parse_args()
    require_at_least_zero({"--pair-tolerance": args.pair_tolerance})
    report = check_dataset(args.data_dir, args.pair_tolerance, args.unlabelled)
    print_report(report)
    return 1 if report.problems else 0


if __name__ == "__main__":
    run_main(main)
