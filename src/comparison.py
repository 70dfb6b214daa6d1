"""The three stages side by side, once all are tested: the table the last test script
prints, ``comparison.json`` with KD - baseline and its paired interval, the figures, and
the warnings when the two students were not trained alike."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .arguments import STAGES
from .cli import ToolError, ensure_writable_dir, read_json, write_json
from .stats import paired_bootstrap

# Settings that must agree between the baseline and the KD student for their comparison to
# mean anything (same split is enforced separately, through split.csv).
COMPARABLE_SETTINGS = ("arch", "weights", "input_size", "epochs", "batch_size", "lr",
                       "weight_decay", "patience", "lr_patience", "lr_factor", "min_lr",
                       "monitor", "seed", "hflip", "crop_scale", "schedule", "warmup_epochs",
                       "mixup", "cutmix", "layer_decay")


def compare_stages(out_dir: Path, assets_dir: Path) -> dict | None:
    """When all three stages are tested: the comparison table, comparison.json, figures."""
    metrics_files = {stage: Path(out_dir) / stage / "test_metrics.json" for stage in STAGES}
    if not all(path.exists() for path in metrics_files.values()):
        missing = [stage for stage, path in metrics_files.items() if not path.exists()]
        print(f"(comparison after the remaining test stage(s): {', '.join(missing)})")
        return None
    metrics = {stage: read_json(path) for stage, path in metrics_files.items()}
    fingerprints = {m.get("split_fingerprint") for m in metrics.values()}
    if len(fingerprints) != 1:
        raise ToolError(f"the test metrics in {out_dir} come from different splits; "
                        f"rerun the test scripts")
    warnings = comparability_warnings(out_dir)

    print()
    print(f"{'model':<22}{'input':<16}{'accuracy':>10}{'macro-F1':>10}{'n':>7}")
    for stage, m in metrics.items():
        size = f"{m['resolution'].upper()} {m['image_size']}->{m['input_size']}"
        print(f"{STAGES[stage]['title']:<22}{size:<16}{100 * m['accuracy']:>9.2f}%"
              f"{100 * m['macro_f1']:>9.2f}%{m['n']:>7}")
    teacher, baseline, kd = metrics["teacher"], metrics["student"], metrics["kd_student"]
    gain = kd["accuracy"] - baseline["accuracy"]
    gap = teacher["accuracy"] - baseline["accuracy"]
    interval = students_interval(out_dir)
    print(f"KD - baseline: {100 * gain:+.2f} points accuracy "
          f"[95% CI {100 * interval['accuracy']['low']:+.2f}, "
          f"{100 * interval['accuracy']['high']:+.2f}], "
          f"{100 * (kd['macro_f1'] - baseline['macro_f1']):+.2f} points macro-F1 "
          f"[{100 * interval['macro_f1']['low']:+.2f}, {100 * interval['macro_f1']['high']:+.2f}]"
          + (f"; {100 * gain / gap:.0f}% of the teacher-baseline gap closed" if gap > 0 else ""))
    print(f"(one run each on {baseline['n']} test images; the interval is a paired bootstrap "
          f"over those images, so it covers test-set noise, not training noise: "
          f"compare_recipes.py gives the spread over seeds)")
    for warning in warnings:
        print(f"warning: {warning}")

    comparison = {"models": metrics, "kd_minus_baseline": {
        "accuracy": gain, "macro_f1": kd["macro_f1"] - baseline["macro_f1"],
        "interval_95": interval},
        "comparable": not warnings, "warnings": warnings}
    write_json(Path(out_dir) / "comparison.json", comparison)
    written = plot_comparison_figures(metrics, out_dir, assets_dir)
    print("figures: " + ", ".join(str(path) for path in written))
    return {**comparison, "figures": written}


def students_interval(out_dir: Path, resamples: int = 10_000) -> dict:
    """Paired bootstrap 95% interval of KD student - baseline on their test predictions."""
    frames = [pd.read_csv(Path(out_dir) / stage / "test_predictions.csv")
              for stage in ("student", "kd_student")]
    if not frames[0]["img_path"].equals(frames[1]["img_path"]):
        raise ToolError(f"the two students in {out_dir} were tested on other images; rerun "
                        f"the test scripts")
    classes = sorted(set(frames[0]["label"]) | set(frames[0]["prediction"])
                     | set(frames[1]["prediction"]))
    ids = {name: number for number, name in enumerate(classes)}
    labels, baseline, kd = (frame.map(ids.get).to_numpy() for frame in
                            (frames[0]["label"], frames[0]["prediction"], frames[1]["prediction"]))
    return paired_bootstrap(labels, baseline, kd, len(classes), resamples=resamples)


def plot_comparison_figures(metrics: dict, out_dir: Path, assets_dir: Path) -> list[Path]:
    """The test comparison bars of the stages in ``metrics`` and, when both students have a
    history, the kd_vs_hard_{train,val}_{acc,loss} curves. Returns the files written."""
    # matplotlib is imported here, not with the module: every train script imports this
    # module, and only the last test script draws (half a second at each start).
    from .plots import plot_comparison, plot_curves
    assets_dir = ensure_writable_dir(assets_dir, "--assets-dir")
    written = [plot_comparison({STAGES[s]["title"]: m for s, m in metrics.items()},
                               assets_dir / "test_accuracy_comparison.png")]
    histories = {"baseline (hard labels)": Path(out_dir) / "student" / "history.csv",
                 "KD student": Path(out_dir) / "kd_student" / "history.csv"}
    if all(path.exists() for path in histories.values()):
        frames = {name: pd.read_csv(path) for name, path in histories.items()}
        for split_name in ("train", "val"):
            # Training loss is plotted as plain cross-entropy: the KD run's total loss has an
            # extra term and would not be on the baseline's scale.
            for kind, column, label in (("acc", f"{split_name}_acc", "accuracy"),
                                        ("loss", "train_ce" if split_name == "train"
                                         else "val_loss", "cross-entropy")):
                path = assets_dir / f"kd_vs_hard_{split_name}_{kind}.png"
                written.append(plot_curves(frames, column, f"{split_name} {label}", path))
    return written


def comparability_warnings(out_dir: Path) -> list[str]:
    configs = {}
    for stage in ("student", "kd_student"):
        path = Path(out_dir) / stage / "config.json"
        if path.exists():
            configs[stage] = read_json(path).get("args", {})
    if len(configs) < 2:
        return ["no config.json for both students; cannot confirm like-for-like settings"]
    differing = [f"{key} ({configs['student'].get(key)!r} vs "
                 f"{configs['kd_student'].get(key)!r})"
                 for key in COMPARABLE_SETTINGS
                 if configs["student"].get(key) != configs["kd_student"].get(key)]
    if differing:
        return ["baseline and KD student were trained with different settings: "
                + ", ".join(differing)]
    return []
