"""`condense compare` end to end on a tiny comparison: leaderboard, pictures, caching per cell,
a failed cell beside completed ones, and one-line errors for bad input before any work."""

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from condense import scores
from condense.compare import student
from condense.compare.render import COLUMNS
from condense.config import ModelConfig
from condense.configure import load_config
from condense.store import Store, load_arrays
from tests.conftest import last_json, run_cli

TINY_COMPARISON = {
    "name": "tiny",
    "presets": "digits-{method}",
    "methods": ["dm", "rded"],
    "ipc": [1],
    "models": ["convnet"],
    "dataset": {"source": "digits", "name": "digits", "train_per_class": 20},
    "evaluate": {"seeds": 2, "full_data_epochs": 1},
    "recipes": {"hard": {"epochs": 4}, "kd": {"epochs": 4, "batch_size": 50}},
    "settings": {
        "dm": {"distill": {"iterations": 2, "checkpoint_every": 2}},
        "dsa": {"distill": {"iterations": 2, "checkpoint_every": 2}},
        # RDED's guard refuses a teacher below this accuracy on real images: a cell that fails.
        "rded": {"teacher": {"epochs": 1}, "distill": {"candidates": 5, "min_teacher_accuracy": 100}},
    },
}


@pytest.fixture
def comparison(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_COMPARISON))
    return path


class _Page(HTMLParser):
    """What the leaderboard page holds: headers, rows (with their class), images, links, script."""

    def __init__(self, text: str):
        super().__init__()
        self.headers: list[str] = []
        self.rows: list[list[str]] = []
        self.classes: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.script = ""
        self._in: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr" and self.headers:
            self.rows.append([])
            self.classes.append(found.get("class") or "")
        elif tag == "img":
            self.images.append(found.get("src") or "")
        elif tag in ("a", "link") or (tag == "script" and "src" in found):
            self.links.append(found.get("href") or found.get("src") or "")
        self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "th":
            self.headers.append(data)
        elif self._in == "td":
            self.rows[-1].append(data)
        elif self._in == "script":
            self.script += data


def _compare(comparison: Path, store: Path, env: dict[str, str], *extra: str) -> dict:
    proc = run_cli(["compare", str(comparison), "--store", str(store), "--json", "-q", *extra], env)
    return last_json(proc.stdout)


def _cells(board: dict) -> dict[str, dict]:
    return {cell["method"]: cell for cell in board["cells"]}


def test_compare_caches_per_cell_and_keeps_failed_cells_as_rows(comparison, tmp_path, prefect_env):
    store = tmp_path / "store"
    first = _compare(comparison, store, prefect_env)
    cells = _cells(first)
    assert set(cells) == {"dm", "rded"}
    dm, rded = cells["dm"], cells["rded"]
    assert dm["status"] == "ok" and dm["cached"] is False and dm["reason"] is None
    assert rded["status"] == "failed" and "distill:" in rded["reason"] and "\n" not in rded["reason"]
    # The presets' ConvNets differ in their norm; the leaderboard says which student each row trained.
    assert dm["student"] == "convnet (instancenorm)" and rded["student"] == "convnet (batchnorm)"
    # Three different trainings, not one subject's result copied into the others.
    assert dm["accuracy"] != dm["random_real"] != dm["full_data"] != dm["accuracy"]
    found = dm["scores"]
    assert found["hlr"] == pytest.approx(
        dm["hard_labels"]["full_data"]["mean"] - dm["hard_labels"]["distilled"]["mean"]
    )
    assert found["ior"] == pytest.approx(dm["accuracy"]["mean"] - dm["random_real"]["mean"])
    assert found["alpha"] == pytest.approx(0.5 * found["ior"] / 100 - 0.5 * found["hlr"] / 100, abs=1e-4)
    assert found["lrs"] == pytest.approx(scores.normalised_exp(found["alpha"]), abs=1e-4)
    assert found["ars"] == pytest.approx(scores.normalised_exp(found["beta"]), abs=1e-4)
    assert dm["calibration"]["ece"] > 0 and dm["calibration"]["ece_scaled"] > 0  # 20 epochs: never exact
    assert dm["cost"]["image_bytes"] == 10 * 8 * 8 and dm["cost"]["label_bytes"] == 10
    images = load_arrays(Store(store).path("distill", dm["distill_key"]) / "synthetic.zarr")["images"]
    real = Store(store).meta("distill", dm["distill_key"])["input_std"]["real"]
    assert dm["input_scale"] == pytest.approx(float(images.astype(np.float64).std()) / real, rel=1e-6)
    assert first["version"] == {"number": 1, "new": True, "created": first["version"]["created"]}
    for path in [*first["files"].values(), *first["pictures"].values()]:
        assert Path(path).is_file() and Path(path).stat().st_size > 0
    assert Path(first["pictures"]["images_ipc1"]).read_bytes().startswith(b"\x89PNG")
    board = Path(first["files"]["markdown"]).read_text()
    assert "failed: distill:" in board and "input std" in board
    assert "| dm | 1 | convnet (instancenorm) | hard |" in board
    table = [line for line in board.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1  # the failed row has every column
    page = _Page(Path(first["files"]["html"]).read_text(encoding="utf-8"))
    assert page.headers == COLUMNS and len(page.rows) == 2 and page.classes == ["", "failed"]
    assert page.rows[0][:4] == ["dm", "1", "convnet (instancenorm)", "hard"]
    assert len(page.images) == len(first["pictures"]) > 0  # every picture, embedded
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.links == [] and "addEventListener" in page.script  # offline; headers sort

    again = _compare(comparison, store, prefect_env)
    assert _cells(again)["dm"]["cached"] is True
    assert _cells(again)["dm"]["accuracy"] == dm["accuracy"]
    assert _cells(again)["rded"]["status"] == "failed"
    assert again["version"]["number"] == 1 and again["version"]["new"] is False

    more = _compare(comparison, store, prefect_env, "--methods", "dm,rded,dsa")
    cells = _cells(more)
    assert cells["dm"]["cached"] is True  # its cells are not rerun
    assert cells["dsa"]["status"] == "ok" and cells["dsa"]["cached"] is False
    assert more["version"]["number"] == 2 and more["version"]["new"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "dm,nope"], "unknown method 'nope'"),
        (["--models", "convnet,resnet999"], "unknown architecture 'resnet999'"),
        (["--ipc", ","], "--ipc is empty"),
        (["--methods", "dm", "--ipc", "1,21"], "ipc=21 is larger than the smallest class"),
    ],
)
def test_bad_input_is_one_line_before_any_work(comparison, tmp_path, ephemeral_env, args, message):
    store = tmp_path / "store"
    proc = run_cli(["compare", str(comparison), "--store", str(store), *args], ephemeral_env, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (store / "distill").exists() and not (store / "evaluate").exists()


def test_the_student_names_a_convnets_norm_and_any_size_it_was_given():
    assert student("convnet", ModelConfig()) == "convnet (instancenorm)"
    assert student("convnet", ModelConfig(norm="none", width=64)) == "convnet (no norm, width 64)"
    assert student("convnet", ModelConfig(norm="batchnorm", depth=4)) == "convnet (batchnorm, depth 4)"
    assert student("resnet18", ModelConfig()) == "resnet18"  # its own norm, whatever the preset's
    pinned = load_config("digits-rded", ["evaluate.model.norm=instancenorm"])
    assert pinned.model.norm == "batchnorm" and student("convnet", pinned.student) == "convnet (instancenorm)"


class _Raising:
    """A settled job whose task raised ``error``, as a Prefect future reports it."""

    def __init__(self, error: BaseException):
        self.error = error

    def result(self):
        raise self.error


def test_a_cell_raising_anything_becomes_a_failed_row_with_its_reason_not_a_stopped_comparison():
    from condense.compare.score import failure
    from condense.compare.spec import Cell
    from condense.errors import DivergenceError
    from condense_flows.compare import settle

    cell = Cell("mtt", 1, "hard", {}, jobs=["experts-1", "distill-1", "evaluate-1"])
    bug = settle(_Raising(RuntimeError("CUDA error: an illegal memory access\nwas encountered")))
    assert failure(cell, {"experts-1": {}, "distill-1": bug, "evaluate-1": None}) == (
        "distill: RuntimeError: CUDA error: an illegal memory access was encountered"
    )
    ours = settle(_Raising(DivergenceError("mtt diverged at iteration 3")))
    assert failure(cell, {"experts-1": ours}) == "experts: mtt diverged at iteration 3"
    with pytest.raises(KeyboardInterrupt):  # an interrupt still stops the whole comparison
        settle(_Raising(KeyboardInterrupt()))
