"""``evaluate_all.py``: test every trained stage, compare each with the baseline student on
the same test images (bootstrap intervals, McNemar), write ``results.md`` and
``results.json``, and refresh the figures. Nothing is retrained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix, f1_score, v_measure_score

from .cli import ToolError, ensure_writable_dir, write_json, write_text
from .data import decode_image
from .plots import plot_confusion, plot_embeddings, plot_per_class_f1, plot_sample_predictions
from .arguments import STAGES, figures_dir
from .comparison import comparability_warnings, plot_comparison_figures
from .stages import load_saved_split, test_stage
from .stats import gap_closed, mcnemar_exact, paired_bootstrap


def evaluate_all(args) -> dict:
    out_dir = Path(args.out_dir)
    split = load_saved_split(args.data_dir, out_dir)
    available = [stage for stage in STAGES if (out_dir / stage / "best.pt").exists()]
    if not available:
        raise ToolError(f"no trained stage in {out_dir} (no <stage>/best.pt); train one first")
    results = {stage: test_stage(stage, split, args, features=args.tsne)
               for stage in available}
    labels = next(iter(results.values()))["labels"].numpy()
    predictions = {stage: r["logits"].argmax(1).numpy() for stage, r in results.items()}
    num_classes = len(split.classes)

    rows = []
    for stage, result in results.items():
        row = {"stage": stage, "model": STAGES[stage]["title"],
               "input": f"{result['resolution'].upper()} {result['image_size']}->"
                        f"{result['input_size']}", "arch": result["arch"],
               "accuracy": result["accuracy"], "macro_f1": result["macro_f1"], "n": result["n"]}
        if "student" in results and stage != "student":
            interval = paired_bootstrap(labels, predictions["student"], predictions[stage],
                                        num_classes, resamples=args.resamples,
                                        seed=args.bootstrap_seed)
            test = mcnemar_exact(predictions["student"] == labels, predictions[stage] == labels)
            row["vs_baseline"] = {**interval, "mcnemar": test}
        rows.append(row)
    summary = {"rows": rows, "resamples": args.resamples, "bootstrap_seed": args.bootstrap_seed,
               "split_fingerprint": split.fingerprint,
               "warnings": comparability_warnings(out_dir) if {"student", "kd_student"}
               <= set(results) else []}
    if {"teacher", "student", "kd_student"} <= set(results):
        summary["gap_closed"] = {key: gap_closed(results["teacher"][key],
                                                 results["student"][key],
                                                 results["kd_student"][key])
                                 for key in ("accuracy", "macro_f1")}

    table = results_table(summary)
    print()
    print(table)
    write_text(out_dir / "results.md", table + "\n")
    write_json(out_dir / "results.json", summary)
    figures = write_figures(results, predictions, labels, split, args)
    print("wrote " + ", ".join(str(path) for path in
                               [out_dir / "results.md", out_dir / "results.json", *figures]))
    return summary


def results_table(summary: dict) -> str:
    """The summary as a Markdown table (also what is printed)."""
    lines = ["| model | input | accuracy | macro-F1 | accuracy vs baseline [95% CI] | "
             "McNemar p | macro-F1 vs baseline [95% CI] |",
             "| --- | --- | ---: | ---: | --- | ---: | --- |"]
    for row in summary["rows"]:
        versus = row.get("vs_baseline")
        if versus:
            accuracy, f1 = versus["accuracy"], versus["macro_f1"]
            compared = (f"{_points(accuracy['difference'])} [{_points(accuracy['low'])}, "
                        f"{_points(accuracy['high'])}]", f"{versus['mcnemar']['p_value']:.3g}",
                        f"{_points(f1['difference'])} [{_points(f1['low'])}, "
                        f"{_points(f1['high'])}]")
        else:
            compared = ("(baseline)" if row["stage"] == "student" else "", "", "")
        lines.append(f"| {row['model']} ({row['arch']}) | {row['input']} | "
                     f"{100 * row['accuracy']:.2f}% | {100 * row['macro_f1']:.2f}% | "
                     f"{compared[0]} | {compared[1]} | {compared[2]} |")
    n = summary["rows"][0]["n"]
    lines.append("")
    lines.append(f"n = {n} test images; differences in points; intervals from "
                 f"{summary['resamples']} paired bootstrap resamples; McNemar exact test on the "
                 f"images where exactly one of the two models is right.")
    gap = summary.get("gap_closed")
    if gap and gap["accuracy"] is not None:
        lines.append(f"The KD student closes {100 * gap['accuracy']:.0f}% of the teacher-baseline "
                     f"accuracy gap.")
    for warning in summary["warnings"]:
        lines.append(f"Warning: {warning}.")
    return "\n".join(lines)


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def write_figures(results: dict, predictions: dict, labels: np.ndarray, split, args) -> list:
    assets = ensure_writable_dir(figures_dir(args), "--assets-dir")
    classes = split.classes
    titles = {stage: STAGES[stage]["title"] for stage in results}
    written = plot_comparison_figures(results, args.out_dir, assets)

    class_ids = np.arange(len(classes))
    per_class = {titles[s]: f1_score(labels, p, labels=class_ids, average=None, zero_division=0)
                 for s, p in predictions.items()}
    written.append(plot_per_class_f1(per_class, classes, assets / "per_class_f1.png"))
    matrices = {titles[s]: confusion_matrix(labels, p, labels=class_ids)
                for s, p in predictions.items() if s != "teacher" or len(predictions) == 1}
    written.append(plot_confusion(matrices, classes, assets / "confusion_matrix.png"))
    if {"student", "kd_student"} <= set(predictions):
        written.append(plot_sample_predictions(
            _samples(predictions, labels, split, args.data_dir, results["student"]["test_index"]),
            assets / "sample_predictions.png"))
    if args.tsne:
        embeddings = {titles[s]: _embedding(r["features"].numpy(), labels, len(classes))
                      for s, r in results.items()}
        written.append(plot_embeddings(embeddings, labels, classes, assets / "tsne.png"))
    return written


def _samples(predictions: dict, labels: np.ndarray, split, data_dir: Path,
             test_index: np.ndarray, count: int = 8) -> list[dict]:
    """Test images for the sample grid: first those where baseline and KD disagree (the
    interesting ones), then the rest, in split order."""
    disagree = np.flatnonzero(predictions["student"] != predictions["kd_student"])
    agree = np.flatnonzero(predictions["student"] == predictions["kd_student"])
    chosen = np.concatenate([disagree, agree])[:count]
    samples = []
    for position in chosen:
        row = split.frame.iloc[test_index[position]]
        samples.append({
            "lr": decode_image(Path(data_dir) / row["img_path"]),
            "hr": decode_image(Path(data_dir) / row["upscale_img_path"]),
            "label": split.classes[labels[position]],
            "baseline": split.classes[predictions["student"][position]],
            "kd_student": split.classes[predictions["kd_student"][position]]})
    return samples


def _embedding(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple:
    """2-D t-SNE of the features, and the V-measure of a k-means clustering (k = number of
    classes) of the features themselves against the true classes: 1 when every class is
    its own cluster, 0 when clusters say nothing about classes."""
    perplexity = float(min(30, max(1, (len(features) - 1) // 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca",
                  random_state=0).fit_transform(features)
    clusters = KMeans(n_clusters=min(num_classes, len(features)), n_init=10,
                      random_state=0).fit_predict(features)
    return points, float(v_measure_score(labels, clusters))
