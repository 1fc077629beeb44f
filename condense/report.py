"""The run summary (the ``--json`` object, ``summary.json``) and its human forms: a terminal table
and a markdown report."""

from __future__ import annotations

from typing import Any


def _cell(entry: dict[str, Any] | None) -> str:
    return "-" if not entry else f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def accuracy_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """One row per evaluation architecture: distilled vs. random real vs. full data."""
    by_arch = summary.get("baselines_by_arch", {})
    return [
        {
            "model": arch,
            "distilled": _cell(entry),
            "random_real": _cell(by_arch.get(arch, {}).get("random_real")),
            "full_data": _cell(by_arch.get(arch, {}).get("full_data")),
        }
        for arch, entry in summary["accuracy"].items()
    ]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def human_bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    step = 0
    while n >= 1024 and step < len(units) - 1:
        n, step = n / 1024, step + 1
    return f"{n:.0f} B" if step == 0 else f"{n:.1f} {units[step]}"


SCALE_TOLERANCE = 2.0
"""How far (as a factor) a synthetic set's input std may stray from the real data's before the
summary warns. Measured on digits at IPC 1 (README, Compare): the sets at 1.5-1.65x (DSA, DREAM,
FTD) scored 60-71% on ResNet-18, those at 2.4-2.6x (MTT, DATM, PAD) 29-39%, DM at 15x 10%
(chance), all 88-94% on ConvNet, whose instance norm divides the scale out."""
SCALE_WARNING = "; networks with BatchNorm trained on it meet test images at another scale"


def input_scale(input_std: dict[str, float] | None) -> float | None:
    """The synthetic set's input std over the real data's (1: the data's own scale); None for a set
    stored before the distill stage measured it."""
    return None if not input_std else input_std["synthetic"] / input_std["real"]


def context_lines(summary: dict[str, Any]) -> list[str]:
    """The teacher and where evaluation labels came from (and what stored labels weigh)."""
    teacher = summary["teacher"]
    labels = summary["labels"]
    lines = []
    if "version" in summary:
        v = summary["version"]
        state = "new" if v["new"] else f"unchanged since {v['created']}"
        lines.append(
            f"version: {summary['dataset']}/{summary['method']}/ipc{summary['ipc']} v{v['number']} ({state})"
        )
    for name, device in summary.get("devices", {}).items():
        detail = (
            f"{device['memory_gib']} GiB" if "memory_gib" in device else f"{device.get('threads')} threads"
        )
        lines.append(f"device {name}: {device['name']} ({detail})")
    lines += [
        f"teacher: {teacher['arch']} ({teacher['source']}), test accuracy {teacher['test_accuracy']:.2f}%",
        f"evaluation recipe: {summary['evaluation_recipe']}, labels: {labels['kind']}",
    ]
    scale = summary.get("input_std")
    ratio = input_scale(scale)
    if ratio is not None:
        lines.append(
            f"input scale: synthetic std {scale['synthetic']:.2f} vs real {scale['real']:.2f} ({ratio:.2f}x)"
            + (SCALE_WARNING if not 1 / SCALE_TOLERANCE <= ratio <= SCALE_TOLERANCE else "")
        )
    stats = summary.get("distill_stats", {})
    if "teacher_synthetic_accuracy" in stats:
        lines.append(
            f"recovery: the teacher classifies {stats['teacher_synthetic_accuracy']:.1f}% of the synthetic"
            f" images correctly; final BN-statistics loss {stats['final_bn_loss']:.4f},"
            f" CE {stats['final_ce']:.4f}"
        )
    for record in stats.get("curricula", []):
        student = record.get("student_accuracy")
        lines.append(
            f"curriculum {record['curriculum']}: {record['size']} per class from {record['init']}"
            + (f", student before it {student:.2f}%" if student is not None else "")
        )
    if "label_bytes" in labels:
        stored, disk = human_bytes(labels["label_bytes"]), human_bytes(labels["label_disk_bytes"])
        lines.append(
            f"stored labels: {stored} ({disk} on disk) vs images {human_bytes(labels['image_bytes'])}"
        )
    return lines


def stage_rows(summary: dict[str, Any]) -> list[list[str]]:
    """stage, compute seconds (``reused`` for a stage whose every artifact was in the store), wall
    seconds, device(s), peak device memory (GPUs only), key."""
    gpu = any("peak_memory_bytes" in s for s in summary["stages"].values())
    rows = [["stage", "compute s", "wall s", "device", *(["peak memory"] if gpu else []), "key"]]
    for name, stage in summary["stages"].items():
        peak = stage.get("peak_memory_bytes")
        rows.append(
            [
                name,
                "reused" if stage["cached"] else f"{stage['seconds']:.1f}",
                f"{stage['wall_seconds']:.1f}",
                ",".join(stage.get("devices", [])) or "-",
                *([human_bytes(peak) if peak is not None else "-"] if gpu else []),
                stage["key"],
            ]
        )
    return rows


def text_table(summary: dict[str, Any]) -> str:
    lines = [
        f"condense: {summary['dataset']} / {summary['method']} / ipc {summary['ipc']}"
        f"  (run {summary['run_id']}, {summary['seconds']:.1f} s)",
        "",
    ]
    lines += _table(stage_rows(summary))
    runs = summary["evaluation_runs"]
    lines += ["", f"test accuracy (%), mean ± std over {runs} fresh networks each:"]
    acc_rows = [["model", "distilled", "random_real", "full_data"]]
    acc_rows += [list(row.values()) for row in accuracy_rows(summary)]
    lines += _table(acc_rows)
    lines += ["", *context_lines(summary)]
    lines += [
        "",
        f"distilled set: {summary['artifacts']['manifest']}",
        f"grid: {summary['artifacts']['grid_png']}",
    ]
    return "\n".join(lines)


def _markdown_table(rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(rows[0]) + " |",
        "|" + "---|" * len(rows[0]),
        *["| " + " | ".join(row) + " |" for row in rows[1:]],
    ]


def markdown(summary: dict[str, Any]) -> str:
    rows = accuracy_rows(summary)
    out = [
        f"# {summary['dataset']} / {summary['method']} / ipc {summary['ipc']}",
        "",
        f"Run `{summary['run_id']}` in {summary['seconds']:.1f} s, store `{summary['store']}`.",
        "",
        "## Test accuracy (%)",
        "",
        "| model | distilled | random real | full data |",
        "|---|---|---|---|",
        *[f"| {r['model']} | {r['distilled']} | {r['random_real']} | {r['full_data']} |" for r in rows],
        "",
        f"Mean ± std over {summary['evaluation_runs']} fresh networks per cell, trained only on that set.",
        "",
        *[f"- {line}" for line in context_lines(summary)],
        "",
        "## Stages",
        "",
        *_markdown_table(stage_rows(summary)),
        "",
        "## Synthetic images",
        "",
        "![synthetic set](grid.png)",
        "",
        f"Shards and manifest: `{summary['artifacts']['manifest']}`",
    ]
    return "\n".join(out) + "\n"


def versions_table(records: list[dict[str, Any]]) -> str:
    """``condense ls``: one row per published version."""
    rows = [["dataset", "method", "ipc", "version", "source", "accuracy", "created"]]
    for r in records:
        arch, acc = next(iter(r["accuracy"].items()))
        rows.append(
            [
                r["dataset"],
                r["method"],
                str(r["ipc"]),
                f"v{r['version']}",
                r["source_fingerprint"][:12],
                f"{acc['mean']:.2f} ± {acc['std']:.2f} ({arch})",
                r["created"],
            ]
        )
    return "\n".join(_table(rows))
