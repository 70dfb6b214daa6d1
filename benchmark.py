"""Training-speed benchmark: our decode-once pipeline against a reference-style per-image
PIL loader, on generated data at the DACON sizes (64x64 LR, 256x256 HR) and counts.

Prints images per second for the input pipeline alone, the compute floor (training steps
on data already on the device) and the full training step, for the teacher, baseline and
KD stages, with the ratios full/floor and ours/reference; writes them to a JSON file.

    python benchmark.py                      # defaults suited to the machine found
    python benchmark.py --images 2000 --steps 3   # a quick look

With --processes, it times instead one epoch of train_teacher.py (the options after --) on
--data-dir with each number of processes under torchrun (make bench-processes: the demo
teacher with 1 and 2):

    python benchmark.py --processes 1 2 --data-dir demo_data -- --weights none --epochs 2
"""
import argparse
import sys
from pathlib import Path

import torch

from src.bench import DACON_IMAGES, STAGE_RESOLUTIONS, BenchSettings, \
    print_processes_report, print_report, run_benchmark, time_processes
from src.cli import ToolError, ensure_writable_dir, pick_device, require_at_least_one, run_main, \
    split_passthrough, write_json
from src.trainer import Runtime


def main() -> int:
    argv, train_args = split_passthrough(
        sys.argv[1:], {"--data-dir", "--out-dir", "--cache-dir", "--overwrite", "--resume"},
        "benchmark.py --processes")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] [-- train_teacher.py options "
                                           "with --processes]",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench"),
                        help="where the generated data, its cache and the JSON report go")
    parser.add_argument("--images", type=int, default=DACON_IMAGES,
                        help="LR/HR pairs to generate (DACON has 15,834)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--arch", default=None,
                        help="network (default: resnet50 on CUDA; resnet18 on the CPU, where "
                             "a resnet50 step at 224 px takes about 10 s)")
    parser.add_argument("--input-size", type=int, default=224,
                        help="network input size (the reference feeds 224)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (default: 64 on CUDA, 32 on the CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps per measurement (default: 30 on CUDA, "
                             "8 on the CPU)")
    parser.add_argument("--pipeline-batches", type=int, default=50,
                        help="timed batches when measuring the input pipeline alone")
    parser.add_argument("--pipeline-rounds", type=int, default=5,
                        help="input-pipeline measurements of ours and of the reference-style "
                             "loader, alternating; the median of each is reported")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers of the reference-style loader (the "
                             "reference uses 2)")
    parser.add_argument("--stages", nargs="+", choices=list(STAGE_RESOLUTIONS),
                        default=list(STAGE_RESOLUTIONS), help="stages to measure")
    parser.add_argument("--json", type=Path, default=None,
                        help="report file (default: <out-dir>/benchmark.json)")
    parser.add_argument("--processes", type=int, nargs="+", default=None, metavar="N",
                        help="instead: seconds per epoch of train_teacher.py (options after "
                             "--) on --data-dir with each number of processes under torchrun")
    parser.add_argument("--data-dir", type=Path, default=Path("demo_data"),
                        help="with --processes: the data set to train on")
    args = parser.parse_args(argv)
    if args.processes is not None:
        require_at_least_one({"--processes": min(args.processes)})
        out_dir = ensure_writable_dir(args.out_dir)
        report = time_processes(args.data_dir, out_dir, args.processes, train_args)
        print_processes_report(report)
        json_path = args.json or out_dir / "processes.json"
        write_json(json_path, report)
        print(f"-> {json_path}")
        return 0
    if train_args:
        raise ToolError("options after -- are for train_teacher.py under --processes")
    if args.images < 250:
        raise ToolError("--images must be at least 250 (25 classes, 10 per class to split)")
    require_at_least_one({"--input-size": args.input_size, "--batch-size": args.batch_size,
                          "--steps": args.steps, "--pipeline-batches": args.pipeline_batches,
                          "--pipeline-rounds": args.pipeline_rounds})
    if args.workers < 0:
        raise ToolError(f"--workers must be 0 or more, not {args.workers}")
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    runtime = Runtime(device=device, amp=cuda, channels_last=cuda)
    out_dir = ensure_writable_dir(args.out_dir)
    settings = BenchSettings(
        images=args.images, arch=args.arch or ("resnet50" if cuda else "resnet18"),
        input_size=args.input_size, batch_size=args.batch_size or (64 if cuda else 32),
        steps=args.steps or (30 if cuda else 8), pipeline_batches=args.pipeline_batches,
        pipeline_rounds=args.pipeline_rounds, reference_workers=args.workers)
    report = run_benchmark(out_dir / "data", out_dir, settings, runtime, args.stages)
    print_report(report)
    json_path = args.json or out_dir / "benchmark.json"
    write_json(json_path, report)
    print(f"-> {json_path}")
    return 0


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    run_main(main)
