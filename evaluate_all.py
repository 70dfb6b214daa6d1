"""Test every trained stage and compare it with the baseline student on the same test images.

Prints one summary table (model, input, accuracy, macro-F1, difference from the baseline
with a paired-bootstrap 95% interval and an exact McNemar p-value), writes it to
<out-dir>/results.md and results.json, and refreshes the figures in --assets-dir (default <out-dir>/figures):
test_accuracy_comparison, kd_vs_hard_* curves, per_class_f1, confusion_matrix,
sample_predictions and tsne (with each model's V-measure). Nothing is retrained.

    python evaluate_all.py --out-dir runs
"""
import argparse

from src.cli import ToolError, require_at_least_one, require_at_least_zero, run_main
from src.data import set_path_policy
from src.report import evaluate_all
from src.arguments import common_arguments, figures_argument


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common_arguments(parser)
    figures_argument(parser, "the figures")
    parser.add_argument("--resamples", type=int, default=10_000,
                        help="paired bootstrap resamples for the 95%% intervals")
    parser.add_argument("--bootstrap-seed", type=int, default=0,
                        help="seed of the bootstrap resampling")
    parser.add_argument("--no-tsne", dest="tsne", action="store_false",
                        default=argparse.SUPPRESS,
                        help="skip the t-SNE figure (the slowest part on large test sets)")
    args = parser.parse_args()
    # SUPPRESS keeps --help from printing "(default: True)" beside a flag that means False.
    args.tsne = getattr(args, "tsne", True)
    if args.resamples < 100:
        raise ToolError("--resamples must be at least 100")
    require_at_least_one({"--batch-size": args.batch_size})
    require_at_least_zero({"--bootstrap-seed": args.bootstrap_seed})
    set_path_policy(args)
    evaluate_all(args)
    return 0


if __name__ == "__main__":
    run_main(main)
