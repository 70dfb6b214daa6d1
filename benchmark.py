"""Training-speed benchmark: our decode-once pipeline against a reference-style per-image
PIL loader, on generated data at the DACON sizes (64x64 LR, 256x256 HR) and counts.

Prints images per second for the input pipeline alone, the compute floor (training steps
on data already on the device) and the full training step, for the teacher, baseline and
KD stages, with the ratios full/floor and ours/reference; writes them to a JSON file.

    python benchmark.py                      # defaults suited to the machine found
    python benchmark.py --images 2000 --steps 3   # a quick look
"""
import argparse
from pathlib import Path

import torch

from src.bench import DACON_IMAGES, STAGE_RESOLUTIONS, BenchSettings, print_report, \
    run_benchmark
from src.cli import ToolError, ensure_writable_dir, pick_device, require_at_least_one, run_main, \
    write_json
from src.trainer import Runtime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    args = parser.parse_args()
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
