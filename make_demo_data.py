"""Write the built-in demo dataset (synthetic birds) in the DACON layout.

The HR twin carries a stripe texture that the LR image mostly loses, so the HR teacher
beats the LR student and distillation has something to pass on. Deterministic for a seed.

    python make_demo_data.py --out demo_data
"""
import argparse
from pathlib import Path

from src.cli import ToolError, run_main
from src.demo import class_names, write_demo_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_data"),
                        help="folder to write (train.csv, test.csv, train/, upscale_train/, test/)")
    parser.add_argument("--per-class", type=int, default=40, help="labelled images per class")
    parser.add_argument("--classes", type=int, default=25,
                        help=f"number of classes (at most {len(class_names())})")
    parser.add_argument("--test-images", type=int, default=50,
                        help="unlabelled LR images in test.csv")
    parser.add_argument("--lr-size", type=int, default=16, help="side of the LR images in pixels")
    parser.add_argument("--scale", type=int, default=4, help="HR side = scale x LR side")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--force", action="store_true",
                        help="write into --out even if it already holds a train.csv")
    args = parser.parse_args()
    if not 1 <= args.classes <= len(class_names()):
        raise ToolError(f"--classes must be between 1 and {len(class_names())}")
    if (args.out / "train.csv").exists() and not args.force:
        raise ToolError(f"{args.out} already holds a dataset; pass --force to write over it")
    write_demo_dataset(args.out, args.per_class, args.test_images, args.lr_size, args.scale,
                       args.seed, args.classes)
    print(f"wrote {args.per_class * args.classes} labelled images ({args.classes} classes, "
          f"LR {args.lr_size}px, HR {args.lr_size * args.scale}px) and {args.test_images} test "
          f"images -> {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
