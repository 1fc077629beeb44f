"""Rendering a leaderboard: the table (text, markdown, CSV) and the pictures of every cell's set."""

from __future__ import annotations

import base64
import csv
import io
from html import escape
from pathlib import Path
from typing import Any

from condense import artifacts, plots
from condense.compare.spec import Comparison
from condense.report import human_bytes
from condense.store import Store


def _cell(entry: dict[str, float] | None) -> str:
    return "-" if not entry else f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = [
    "method", "ipc", "student", "labels", "accuracy", "random real", "full data", "HLR", "IOR", "LRS", "ARS",
    "ECE", "ECE (T)", "ECE (MTS)", "input std", "distill s", "images", "labels size", "status",
]  # fmt: skip


def rows(entries: list[dict[str, Any]]) -> list[list[str]]:
    """The leaderboard as text cells, best accuracy first within each IPC and architecture."""
    ordered = sorted(
        entries,
        key=lambda e: (e["ipc"], e["arch"], e["status"] != "ok", -(e.get("accuracy") or {"mean": 0})["mean"]),
    )
    out = [COLUMNS]
    for e in ordered:
        if e["status"] != "ok":
            out.append(
                [e["method"], str(e["ipc"]), e["student"], e["regime"], *["-"] * 14, f"failed: {e['reason']}"]
            )
            continue
        s, c = e["scores"], e["cost"]
        out.append(
            [
                e["method"],
                str(e["ipc"]),
                e["student"],
                e["regime"],
                _cell(e["accuracy"]),
                _cell(e["random_real"]),
                _cell(e["full_data"]),
                _number(s.get("hlr")),
                _number(s.get("ior")),
                _number(s.get("lrs"), 3),
                _number(s.get("ars"), 3),
                _number(e["calibration"]["ece"]),
                _number(e["calibration"]["ece_scaled"]),
                _number(e["calibration"].get("ece_masked")),
                "-" if e["input_scale"] is None else f"{e['input_scale']:.2f}x",
                f"{c['distill_seconds']:.1f}",
                human_bytes(c["image_bytes"]),
                human_bytes(c["label_bytes"]),
                "ok (cached)" if e["cached"] else "ok",
            ]
        )
    return out


def text_table(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )


SCORES_NOTE = """\
Student: the network trained on the set (a ConvNet shows its norm: each method's preset uses its
paper's, instance norm for the hard and learned labels and batch norm for the teacher-based methods,
unless evaluate.model pins one; compare accuracies within one student). Accuracy: test accuracy (%)
of fresh networks trained only on the set, final epoch, mean ± std over seeds; random real: as many
random real images per class, same labels and recipe; full data: the whole training set, same
recipe. HLR (hard-label recovery) = full data minus distilled, both with hard labels under the
hard-label recipe (points; lower is better). IOR (improvement over random) = distilled minus random
real (points). DD-Ranking's scores from accuracies as fractions a = %/100: LRS = (e^alpha - e^-1) /
(e - e^-1) with alpha = 0.5 IOR - 0.5 HLR; ARS the same map of beta = 0.5 (a_syn - a_rand with
augmentation) + 0.5 (a_syn - a_rand without). ECE: expected calibration error (%, 15 bins) of the
distilled-set students on the test split; ECE (T): after temperature scaling fitted on training
images held out of their training; ECE (MTS): after masked temperature scaling (Zhu et al. 2023),
its mask ratio and temperature both chosen on those held-out images, never on the test split. Input
std: the std of the set's network inputs over that of real training inputs (1.00x: the data's
scale; a set far from it trains BatchNorm statistics that test images do not have). Labels size:
hard labels one byte each, learned/soft labels float32 rows, stored KD labels as stored, online KD
the teacher.
"""


def markdown(board: dict[str, Any]) -> str:
    table = rows(board["cells"])
    lines = [
        f"# {board['name']}: {board['dataset']}",
        "",
        f"Run `{board['run_id']}` ({board['seconds']:.0f} s).",
        "",
        "| " + " | ".join(table[0]) + " |",
        "|" + "---|" * len(table[0]),
        *["| " + " | ".join(row) + " |" for row in table[1:]],
        "",
        SCORES_NOTE,
        *[f"![{name}]({Path(path).name})" for name, path in board["pictures"].items()],
    ]
    return "\n".join(lines) + "\n"


_PAGE_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 16px 0; }
th, td { padding: 4px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
th:hover { background: #e4e4e4; }
td:nth-child(-n+4), th:nth-child(-n+4) { text-align: left; }
tr.failed td { color: #999; }
figure { display: inline-block; margin: 8px 16px 8px 0; vertical-align: top; }
figcaption { color: #555; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
p.note { max-width: 60em; color: #444; }
"""
_PAGE_SCRIPT = """
document.querySelectorAll("th").forEach((th, column) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0];
  const up = th.dataset.order !== "up";
  document.querySelectorAll("th").forEach(h => delete h.dataset.order);
  th.dataset.order = up ? "up" : "down";
  const key = row => {
    const text = row.cells[column].dataset.sort ?? row.cells[column].textContent;
    const number = parseFloat(text);
    return Number.isNaN(number) ? text : number;
  };
  const rows = [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    const order = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
    return up ? order : -order;
  });
  rows.forEach(row => body.appendChild(row));
}));
"""


def html_page(board: dict[str, Any]) -> str:
    """The leaderboard as one self-contained page: the table (click a header to sort by it), the
    notes, and every picture embedded, so it opens offline, mailed or copied anywhere."""
    table = rows(board["cells"])
    head = "".join(f"<th title='sort by {escape(c)}'>{escape(c)}</th>" for c in table[0])
    body = []
    for row in table[1:]:
        failed = row[-1].startswith("failed")
        cells = "".join(f"<td>{escape(cell)}</td>" for cell in row)
        body.append(f"<tr{' class=failed' if failed else ''}>{cells}</tr>")
    figures = []
    for name, path in board["pictures"].items():
        encoded = base64.b64encode(Path(path).read_bytes()).decode()
        figures.append(
            f"<figure><img alt='{escape(name)}' src='data:image/png;base64,{encoded}'>"
            f"<figcaption>{escape(name.replace('_', ' '))}</figcaption></figure>"
        )
    title = f"{board['name']}: {board['dataset']}"
    cells = f"methods {', '.join(board['methods'])}; IPC {', '.join(map(str, board['ipc']))}"
    return "\n".join(
        [
            "<!doctype html>",
            "<html lang=en><head><meta charset=utf-8>",
            f"<title>{escape(title)}</title><style>{_PAGE_STYLE}</style></head><body>",
            f"<h1>{escape(title)}</h1>",
            f"<p>Run <code>{escape(board['run_id'])}</code> ({board['seconds']:.0f} s); {escape(cells)}.</p>",
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
            f"<p class=note>{escape(SCORES_NOTE)}</p>",
            *figures,
            f"<script>{_PAGE_SCRIPT}</script></body></html>",
        ]
    )


def csv_text(entries: list[dict[str, Any]]) -> str:
    """One row per cell, flat columns (accuracies' mean and std, scores, calibration, cost)."""
    fields = ["method", "ipc", "arch", "student", "regime", "status", "reason", "cached"]
    pairs = ["accuracy", "random_real", "full_data"]
    extra = ["hlr", "ior", "lrs", "ars", "ece", "ece_scaled", "ece_masked", "input_scale"]
    extra += ["distill_seconds", "upstream_seconds", "image_bytes", "label_bytes"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*fields, *(f"{p}_{s}" for p in pairs for s in ("mean", "std")), *extra])
    for e in entries:
        ok = e["status"] == "ok"
        values = [e[f] for f in fields]
        values += [(e.get(p) or {}).get(s) if ok else None for p in pairs for s in ("mean", "std")]
        found = {**e.get("scores", {}), **e.get("calibration", {}), **(e.get("cost") or {})}
        found["input_scale"] = e.get("input_scale")
        values += [found.get(x) for x in extra]
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def pictures(
    comparison: Comparison, store: Store, entries: list[dict[str, Any]], folder: Path
) -> dict[str, str]:
    """Accuracy against IPC per architecture (with random-real and full-data lines per label
    regime), accuracy against distillation time, and each IPC's synthetic images, one row per
    method and one column per class; returns {name: path}."""
    out: dict[str, str] = {}
    ok = [e for e in entries if e["status"] == "ok"]
    for arch in comparison.spec.models:
        mine = [e for e in ok if e["arch"] == arch]
        if not mine:
            continue
        lines: dict[str, list[tuple[float, float]]] = {}
        dashed: dict[str, list[tuple[float, float]]] = {}
        for e in sorted(mine, key=lambda e: e["ipc"]):
            lines.setdefault(e["method"], []).append((e["ipc"], e["accuracy"]["mean"]))
            if e["random_real"]:
                dashed.setdefault(f"random real ({e['regime']})", []).append(
                    (e["ipc"], e["random_real"]["mean"])
                )
            if e["full_data"]:
                dashed.setdefault(f"full data ({e['regime']})", []).append((e["ipc"], e["full_data"]["mean"]))
        dashed = {k: sorted(set(v)) for k, v in dashed.items()}
        path = folder / f"accuracy-vs-ipc-{arch}.png"
        plots.line_chart(
            lines,
            dashed,
            f"{comparison.spec.name}: test accuracy vs images per class ({arch})",
            "images per class",
            "test accuracy (%)",
            log_x=True,
        ).save(path)
        out[f"accuracy_vs_ipc_{arch}"] = str(path)
        points = {
            f"{e['method']} ipc{e['ipc']}": (max(e["cost"]["distill_seconds"], 0.01), e["accuracy"]["mean"])
            for e in mine
        }
        path = folder / f"accuracy-vs-time-{arch}.png"
        plots.scatter_chart(
            points,
            f"{comparison.spec.name}: accuracy vs distillation time ({arch})",
            "distillation seconds",
            "test accuracy (%)",
            log_x=True,
        ).save(path)
        out[f"accuracy_vs_time_{arch}"] = str(path)
    classes = store.meta("dataset", str(comparison.cells[0].plans["main"].keys["dataset"]))["card"]["classes"]
    for ipc in comparison.spec.ipc:
        sets = {}
        for cell in comparison.cells:
            if cell.ipc == ipc and any(e["method"] == cell.method and e["ipc"] == ipc for e in ok):
                arrays = artifacts.load_synthetic_arrays(store, str(cell.plans["main"].keys["distill"]))
                sets[cell.method] = (arrays["pixels"], arrays["labels"])
        if sets:
            path = folder / f"images-ipc{ipc}.png"
            plots.image_rows(sets, classes, f"synthetic images, ipc {ipc} (first of each class)").save(path)
            out[f"images_ipc{ipc}"] = str(path)
    return out
