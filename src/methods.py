"""``compare_methods.py``: one KD student per distillation method, same split, seed, epochs
and teacher, against the baseline student of the run folder; prints and saves a table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .cli import ToolError, read_json, write_json, write_text
from .distill import parse_method
from .seeds import run_stage_in


def compare_methods(data_dir: Path, out_dir: Path, methods: list[str],
                    train_args: list[str]) -> list[dict]:
    out_dir = Path(out_dir)
    for method in methods:
        parse_method(method)                       # fail before any training
    baseline_metrics = out_dir / "student" / "test_metrics.json"
    needed = [out_dir / "split.csv", out_dir / "teacher" / "best.pt", baseline_metrics,
              out_dir / "student" / "config.json"]
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise ToolError(f"compare_methods needs a run folder with a trained teacher and a "
                        f"tested baseline student; missing: {', '.join(missing)}")
    baseline = read_json(baseline_metrics)
    # The baseline's own settings, so every method trains exactly as the baseline did.
    base_args = read_json(out_dir / "student" / "config.json")["args"]
    settings = []
    for key in ("arch", "weights", "input_size", "epochs", "batch_size", "lr", "weight_decay",
                "lr_factor", "lr_patience", "min_lr", "patience", "monitor", "crop_scale",
                "seed"):
        settings += [f"--{key.replace('_', '-')}", str(base_args[key])]
    if not base_args.get("hflip", True):
        settings.append("--no-hflip")
    rows = []
    for method in methods:
        method_dir = out_dir / "methods" / method
        run_stage_in(method_dir, "kd_student", out_dir, data_dir,
                     ["--method", method, "--teacher-ckpt", str(out_dir / "teacher" / "best.pt"),
                      *settings, *train_args], f"method {method}")
        metrics = read_json(method_dir / "kd_student" / "test_metrics.json")
        history = pd.read_csv(method_dir / "kd_student" / "history.csv")
        rows.append({"method": method, "accuracy": metrics["accuracy"],
                     "macro_f1": metrics["macro_f1"],
                     "accuracy_vs_baseline": metrics["accuracy"] - baseline["accuracy"],
                     "macro_f1_vs_baseline": metrics["macro_f1"] - baseline["macro_f1"],
                     "seconds_per_epoch": float(history["seconds"].mean()),
                     "epochs": int(len(history)), "n": metrics["n"]})
    table = methods_table(rows, baseline)
    print()
    print(table)
    write_text(out_dir / "methods" / "comparison.md", table + "\n")
    write_json(out_dir / "methods" / "comparison.json", {"baseline": baseline, "rows": rows})
    print(f"-> {out_dir / 'methods' / 'comparison.md'}, comparison.json")
    return rows


def methods_table(rows: list[dict], baseline: dict) -> str:
    lines = ["| method | test accuracy | macro-F1 | accuracy vs baseline | macro-F1 vs baseline "
             "| s/epoch |", "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| baseline (hard labels) | {100 * baseline['accuracy']:.2f}% | "
             f"{100 * baseline['macro_f1']:.2f}% | | | |"]
    for row in rows:
        lines.append(f"| {row['method']} | {100 * row['accuracy']:.2f}% | "
                     f"{100 * row['macro_f1']:.2f}% | {100 * row['accuracy_vs_baseline']:+.2f} | "
                     f"{100 * row['macro_f1_vs_baseline']:+.2f} | "
                     f"{row['seconds_per_epoch']:.1f} |")
    lines.append("")
    lines.append(f"One run per method, n = {baseline['n']} test images: same split, seed, "
                 f"epochs and teacher for all; differences in points.")
    return "\n".join(lines)
