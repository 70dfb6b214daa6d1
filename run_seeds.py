"""Train and test stages for several seeds on one split; report mean and std.

Every seed uses a copy of <out-dir>/split.csv (the same images for all), its own folder
<out-dir>/seeds/seed<k>/, and the same training settings (anything after -- goes to every
train script that takes it: the distillation flags to the KD student only, so the baseline
trains as its KD student does without the teacher). Rerunning continues: finished seeds are
kept, interrupted ones resumed.

    python run_seeds.py --seeds 0 1 2 -- --epochs 30
    python run_seeds.py --seeds 0 1 2 --stages student kd_student   # teacher from <out-dir>
"""
import argparse
import sys
from pathlib import Path

from src.cli import ToolError, require_at_least_one, \
    require_at_least_zero, run_main, split_passthrough
from src.seeds import add_processes_argument, run_seeds
from src.arguments import STAGES, config_flags


def main() -> int:
    argv, train_args = split_passthrough(
        sys.argv[1:], {"--seed", "--out-dir", "--data-dir", "--resume", "--overwrite"},
        "run_seeds.py")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] [-- train-script options]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="folder holding train.csv and the images")
    parser.add_argument("--out-dir", type=Path, default=Path("runs"),
                        help="main run folder: its split.csv (made if missing) and teacher are "
                             "used; seeds go to <out-dir>/seeds/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds (initialisation, data order, augmentation)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES),
                        default=["student", "kd_student"],
                        help="stages to run per seed; without teacher, the KD students all "
                             "learn from <out-dir>/teacher/best.pt")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the split when <out-dir> has none yet")
    parser.add_argument("--config", type=Path, default=None,
                        help="RUN/config.json of an earlier run: its training settings are "
                             "the shared train-script flags (those after -- win); the data, "
                             "folders, seeds and teacher stay this command's")
    add_processes_argument(parser)
    args = parser.parse_args(argv)
    if args.config:
        train_args = [*config_flags(args.config, "run_seeds.py"), *train_args]
        print(f"settings from {args.config}: {' '.join(train_args)}")
    require_at_least_one({"--nproc-per-node": args.nproc_per_node})
    require_at_least_zero({"--seeds": args.seeds, "--split-seed": args.split_seed})
    if len(set(args.seeds)) != len(args.seeds):
        raise ToolError("--seeds has duplicates")
    stages = [stage for stage in STAGES if stage in args.stages]   # teacher before students
    run_seeds(args.data_dir, args.out_dir, args.seeds, stages, train_args, args.split_seed,
              args.nproc_per_node)
    return 0


if __name__ == "__main__":
    run_main(main)
