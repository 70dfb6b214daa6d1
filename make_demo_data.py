"""Write a dataset in the DACON layout: the built-in synthetic birds (default), or real
images from the Fashion-MNIST train-* idx files (--fashion-mnist IDX_DIR).

Synthetic: the HR twin carries a stripe texture that the LR image mostly loses, so the HR
teacher beats the LR student and distillation has something to pass on. Fashion-MNIST:
each 28x28 photo is resized to the HR side and box-filtered down to the LR side; the
t10k-* files are never read. Both are deterministic for a seed.

    python make_demo_data.py --out demo_data
    python make_demo_data.py --fashion-mnist /usr/share/datasets/fashion-mnist \\
        --out fmnist_data --per-class 500 --lr-size 8 --scale 4
"""
import argparse
from pathlib import Path

from src.cli import ToolError, require_at_least_one, require_at_least_zero, run_main
from src.demo import class_names, write_demo_dataset
from src.fashion_mnist import write_fashion_mnist_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_data"),
                        help="folder to write (train.csv, test.csv, train/, upscale_train/, test/)")
    parser.add_argument("--fashion-mnist", type=Path, default=None, metavar="IDX_DIR",
                        help="folder with Fashion-MNIST's train-images-idx3-ubyte and "
                             "train-labels-idx1-ubyte (.gz or raw): write real images instead "
                             "of synthetic ones (Debian: apt-get install dataset-fashion-mnist "
                             "puts them in /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--per-class", type=int, default=40, help="labelled images per class")
    parser.add_argument("--classes", type=int, default=25,
                        help=f"synthetic data: number of classes (at most {len(class_names())}; "
                             f"Fashion-MNIST always has 10)")
    parser.add_argument("--test-images", type=int, default=50,
                        help="unlabelled LR images in test.csv (Fashion-MNIST: drawn from "
                             "images not in train.csv; their labels go to test_labels.csv)")
    parser.add_argument("--unlabelled", type=int, default=0, metavar="N",
                        help="also write N HR images without labels (unlabelled/, "
                             "unlabelled.csv), disjoint from the labelled and test images: a "
                             "transfer set for train_kd_student.py --unlabelled")
    parser.add_argument("--lr-size", type=int, default=16, help="side of the LR images in pixels")
    parser.add_argument("--scale", type=int, default=4,
                        help="HR side = scale x LR side (at least 2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed (synthetic images; which Fashion-MNIST images)")
    parser.add_argument("--force", action="store_true",
                        help="write into --out even if it already holds a train.csv")
    args = parser.parse_args()
    require_at_least_one({"--per-class": args.per_class, "--test-images": args.test_images,
                          "--lr-size": args.lr_size})
    require_at_least_zero({"--unlabelled": args.unlabelled, "--seed": args.seed})
    if args.scale < 2:
        raise ToolError(f"--scale must be at least 2 (got {args.scale})")
    if not 1 <= args.classes <= len(class_names()):
        raise ToolError(f"--classes must be between 1 and {len(class_names())}")
    if (args.out / "train.csv").exists() and not args.force:
        raise ToolError(f"{args.out} already holds a dataset; pass --force to write over it")
    hr_size = args.lr_size * args.scale
    if args.fashion_mnist is not None:
        counts = write_fashion_mnist_dataset(args.fashion_mnist, args.out, args.per_class,
                                             args.test_images, args.lr_size, args.scale,
                                             args.seed, unlabelled=args.unlabelled)
        print(f"wrote {counts['labelled']} labelled Fashion-MNIST images (10 classes, LR "
              f"{args.lr_size}px, HR {hr_size}px), {counts['test']} test images "
              f"(labels in test_labels.csv) and {counts['unlabelled']} unlabelled HR images "
              f"-> {args.out}")
        return 0
    write_demo_dataset(args.out, args.per_class, args.test_images, args.lr_size, args.scale,
                       args.seed, args.classes, unlabelled=args.unlabelled)
    print(f"wrote {args.per_class * args.classes} labelled images ({args.classes} classes, "
          f"LR {args.lr_size}px, HR {hr_size}px), {args.test_images} test images and "
          f"{args.unlabelled} unlabelled HR images -> {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
