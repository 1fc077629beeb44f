"""The BPTT line (DD, RaT-BPTT, AT-BPTT): their meta-gradients against brute-force autograd, where
their windows lie, that they lower their losses, resume after a kill, and beat random real images on
digits end to end."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from statistics import mean
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condense import artifacts
from condense.config import DatasetConfig, ModelConfig
from condense.configure import load_config
from condense.errors import ConfigError, DivergenceError
from condense.methods import atbptt, bptt, dd, get_method, ratbptt
from condense.methods.base import DistillInputs
from condense.methods.trajectory import Step
from condense.models import FlatParams
from condense.prepare import PreparedDataset
from condense.progress import SILENT
from condense.store import Store
from tests.conftest import Notes, kill_distillation_at_first_checkpoint, plan_for, run_jobs, run_pipeline
from tests.test_matching import MemoryCheckpoints


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These loops are many tiny steps: on 2 shared cores, torch's thread pool costs more than it
    gives (20x here). Restored for the modules after this one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ the meta-gradient, brute force

CLASSES, PER_CLASS = 2, 2


def _tiny_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2-layer MLP on 4 synthetic 1x2x2 images (2 classes), and a real batch of 6, in float64."""
    g = torch.Generator().manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, CLASSES)).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    images = torch.randn(CLASSES * PER_CLASS, 1, 2, 2, generator=g, dtype=torch.float64)
    real = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    real_labels = torch.tensor([0, 1, 0, 1, 1, 0])
    logits = torch.randn(CLASSES * PER_CLASS, CLASSES, generator=g, dtype=torch.float64)
    return mlp, images, real, real_labels, logits


def _by_hand(mlp: nn.Module, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward written out with explicit weights (no FlatParams, no functional_call)."""
    w1, b1, w2, b2 = params
    return torch.tanh(x.flatten(1) @ w1.T + b1) @ w2.T + b2


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if targets.is_floating_point():
        return -(torch.softmax(targets, 1) * torch.log_softmax(logits, 1)).sum(1).mean()
    return F.cross_entropy(logits, targets)


DD_STEPS = [Step(torch.tensor([0, 2]), 0), Step(torch.tensor([1, 3]), 0)] * 2
"""DD's schedule for ipc 2, one image per class a step, two epochs: batches {0, 2}, {1, 3}, twice."""


def _dd_by_hand(mlp, images, raw_lrs, real, real_labels) -> torch.Tensor:
    labels = torch.tensor([0, 0, 1, 1])
    params = [p.detach().clone().requires_grad_(True) for p in mlp.parameters()]
    for i, step in enumerate(DD_STEPS):
        loss = F.cross_entropy(_by_hand(mlp, params, images[step.indices]), labels[step.indices])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        params = [p - F.softplus(raw_lrs[i]) * g for p, g in zip(params, grads, strict=True)]
    return F.cross_entropy(_by_hand(mlp, params, real), real_labels)


@pytest.mark.parametrize("memory", ["unrolled", "constant"])
def test_dd_gradients_of_pixels_and_step_sizes_equal_brute_force_autograd(memory):
    mlp, images, real, real_labels, _ = _tiny_problem()
    schedule = dd.schedule(CLASSES, PER_CLASS, 1, 2)
    assert [s.indices.tolist() for s in schedule] == [s.indices.tolist() for s in DD_STEPS]
    raw = torch.tensor([bptt.raw_step_size(lr) for lr in (0.5, 0.3, 0.2, 0.4)], dtype=torch.float64)

    x, r = images.clone().requires_grad_(True), raw.clone().requires_grad_(True)
    expected = torch.autograd.grad(_dd_by_hand(mlp, x, r, real, real_labels), [x, r])

    x, r = images.clone().requires_grad_(True), raw.clone().requires_grad_(True)
    net = FlatParams(mlp)
    inner = bptt.Inner(net, net.flatten(), schedule, bptt.LearnedStepGD(r))
    labels = torch.tensor([0, 0, 1, 1])
    outcome = bptt.window_gradient(inner, 0, real, real_labels, x, labels, memory)
    assert outcome.loss.item() == pytest.approx(
        _dd_by_hand(mlp, images, raw, real, real_labels).item(), rel=1e-12
    )
    for got, want in zip([x.grad, r.grad], expected, strict=True):
        assert want.abs().max() > 1e-4  # the case has a gradient to get wrong
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_dds_step_size_gradient_matches_finite_differences():
    """Independent of autograd: central differences of the loss in each raw step size."""
    mlp, images, real, real_labels, _ = _tiny_problem()
    raw = torch.tensor([bptt.raw_step_size(lr) for lr in (0.5, 0.3, 0.2, 0.4)], dtype=torch.float64)
    r = raw.clone().requires_grad_(True)
    net = FlatParams(mlp)
    inner = bptt.Inner(net, net.flatten(), DD_STEPS, bptt.LearnedStepGD(r))
    bptt.window_gradient(inner, 0, real, real_labels, images, torch.tensor([0, 0, 1, 1]), "unrolled")
    h = 1e-6
    numeric = [
        (
            _dd_by_hand(mlp, images, raw + h * e, real, real_labels)
            - _dd_by_hand(mlp, images, raw - h * e, real, real_labels)
        ).item()
        / (2 * h)
        for e in torch.eye(4, dtype=torch.float64)
    ]
    torch.testing.assert_close(r.grad, torch.tensor(numeric, dtype=torch.float64), rtol=1e-5, atol=1e-9)


RAT_STEPS = [Step(torch.tensor(i), 0) for i in ([0, 2], [1, 3], [0, 3], [1, 2], [0, 2], [1, 3], [0, 1])]


def _ratbptt_by_hand(mlp, images, logits, real, real_labels, start: int, lr: float) -> torch.Tensor:
    """The official code's structure: torch.optim.Adam trains a module ``start`` steps, then a
    differentiable Adam carries on from that optimizer's state (higher copies it) to the end."""
    module = _copy(mlp)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    for step in RAT_STEPS[:start]:
        optimizer.zero_grad()
        _soft_ce(module(images[step.indices].detach()), logits[step.indices].detach()).backward()
        optimizer.step()
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    states = [optimizer.state[p] for p in module.parameters()]
    m = [s["exp_avg"].clone() if s else torch.zeros_like(p) for s, p in zip(states, params, strict=True)]
    v = [s["exp_avg_sq"].clone() if s else torch.zeros_like(p) for s, p in zip(states, params, strict=True)]
    for t, step in enumerate(RAT_STEPS[start:], start=start + 1):
        loss = _soft_ce(_by_hand(mlp, params, images[step.indices]), logits[step.indices])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        m = [0.9 * a + 0.1 * g for a, g in zip(m, grads, strict=True)]
        v = [0.999 * b + 0.001 * g * g for b, g in zip(v, grads, strict=True)]
        params = [
            p - lr / (1 - 0.9**t) * a / (b.sqrt() / math.sqrt(1 - 0.999**t) + 1e-8)
            for p, a, b in zip(params, m, v, strict=True)
        ]
    return F.cross_entropy(_by_hand(mlp, params, real), real_labels)


def _copy(mlp: nn.Module) -> nn.Module:
    copy = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, CLASSES)).double()
    copy.load_state_dict(mlp.state_dict())
    return copy


@pytest.mark.parametrize("memory", ["unrolled", "constant"])
def test_ratbptts_windowed_gradient_equals_brute_force_truncated_autograd(memory):
    mlp, images, real, real_labels, logits = _tiny_problem()
    start, lr = 3, 0.05
    x, y = images.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    expected = torch.autograd.grad(_ratbptt_by_hand(mlp, x, y, real, real_labels, start, lr), [x, y])

    net = FlatParams(mlp)
    x, y = images.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    inner = bptt.Inner(net, net.flatten(), RAT_STEPS, bptt.Adam(lr))
    bptt.window_gradient(inner, start, real, real_labels, x, y, memory)
    for got, want in zip([x.grad, y.grad], expected, strict=True):
        assert want.abs().max() > 1e-4
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    # The truncation is real: the whole unroll's gradient is another one.
    x = images.clone().requires_grad_(True)
    full = torch.autograd.grad(_ratbptt_by_hand(mlp, x, logits, real, real_labels, 0, lr), x)[0]
    assert (full - expected[0]).abs().max() > 1e-3


# ------------------------------------------------------------------ where the windows lie


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    from condense.prepare import load
    from condense.stages.dataset import prepare

    store = Store(tmp_path_factory.mktemp("bptt-digits"))
    key, _ = prepare(DatasetConfig(train_per_class=30), store, 1)
    return load(store, key)


MODEL = ModelConfig(width=16)


def _inputs(data: PreparedDataset, cfg: Any, seed: int = 0, ipc: int = 1) -> DistillInputs:
    return DistillInputs(data, ipc, seed, cfg, MODEL, load_config("digits-mtt").dsa)


def test_ratbptts_window_is_where_the_seed_says(digits):
    cfg = ratbptt.RaTBPTTConfig(iterations=8, unroll=12, window=4, min_start=2, window_every=2, batch_real=32)
    history = ratbptt.distill(_inputs(digits, cfg, seed=3), MemoryCheckpoints(), SILENT).history
    starts = [h["window_start"] for h in history]
    assert starts == [ratbptt.random_window(cfg, 3, it // 2).start for it in range(8)]
    assert starts[0::2] == starts[1::2]  # one draw per window_every iterations
    draws = [ratbptt.random_window(cfg, 3, d).start for d in range(40)]
    assert set(draws) == set(range(2, 9))  # uniform over [min_start, N - W], both ends reached
    assert draws != [ratbptt.random_window(cfg, 4, d).start for d in range(40)]  # another seed, other windows
    assert all(h["window"] == 4 for h in history)
    end = cfg.model_copy(update={"placement": "end"})
    assert {ratbptt.random_window(end, 3, d) for d in range(10)} == {ratbptt.Window(8, 4)}


def test_at_bptt_draws_positions_by_gradient_norm_and_sizes_windows_by_its_change():
    peaked = [0.0, 1.0, 40.0, 2.0]
    assert {atbptt.sample_position(peaked, bptt.draw_generator(0, d)) for d in range(20)} == {2}
    flat = [1.0] * 4
    assert {atbptt.sample_position(flat, bptt.draw_generator(0, d)) for d in range(40)} == {0, 1, 2, 3}
    norms = [1.0, 1.0, 3.0, 3.5]  # changes 0, 0, 2, 0.5: ranks 0, 0, 3, 2 among the sorted changes
    assert [atbptt.adaptive_length(norms, p, 10, 4) for p in range(4)] == [6, 6, 12, 10]


def test_at_bptts_stages_follow_the_official_counters():
    cfg = atbptt.ATBPTTConfig(unroll=20, window=8, window_range=2)  # patience ceil(3.0) = 3, ceil(2.5) = 3
    placement = atbptt.AdaptiveWindow(cfg, 0, 1, None)  # type: ignore[arg-type]  # no probe is run here
    stages = []
    for accuracy in [10, 20, 21, 22, 40, 41, 42, 43, 43.5, 44, 44.2, 60]:
        placement.end_pass(accuracy)
        stages.append(placement.stage)
    # Gains: 10, 10, 1, 1, 18, 1, 1, 1 (third calm pass: stage 2; that pass gains 1, not < 1), then
    # 0.5, 0.5, 0.2 (third calm pass of stage 2: stage 3), and stage 3 stays.
    assert stages == [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert atbptt.patience(0.15, 200) == 30 and atbptt.patience(0.125, 300) == 38


def test_at_bptts_window_moves_with_its_stage(digits):
    # Gains can never reach 100 points: every pass is calm, so the stages move every patience passes.
    cfg = atbptt.ATBPTTConfig(
        iterations=18,
        unroll=16,
        window=6,
        window_range=2,
        window_every=2,
        batch_real=32,
        stage2_gain=100,
        stage3_gain=100,
        stage2_patience=0.25,  # 4 passes
        stage3_patience=0.125,  # 2 passes
    )
    history = atbptt.distill(_inputs(digits, cfg), MemoryCheckpoints(), SILENT).history
    stages = [h["stage"] for h in history]
    # Stage 2 after 4 calm passes; the pass that enters it already counts toward stage 3 (the official
    # order of the checks), so 2 calm passes end stage 2 one pass later.
    assert stages == [1] * 8 + [2] * 2 + [3] * 8
    for h in history:
        end = h["window_start"] + h["window"]
        assert h["window_start"] >= 0 and end <= 16
        if h["stage"] == 1:
            assert 4 <= h["window"] < 8
        else:
            assert h["window"] == {2: 8, 3: 4}[h["stage"]]
    # One placement per pass of window_every iterations.
    assert all(history[i]["window_start"] == history[i + 1]["window_start"] for i in range(0, 18, 2))


# ------------------------------------------------------------------ the outer loss falls


FAST = {"inner_lr": 0.01}
"""Ten inner steps at the papers' 0.001 barely train the network, whose loss then starts and stays near
log(10): a faster inner network shows the outer loss moving within 40 iterations."""


def _falls(losses: list[float], ratio: float) -> bool:
    return mean(losses[-5:]) < ratio * mean(losses[:5])


@pytest.mark.parametrize(
    ("name", "settings", "ratio"),
    [
        ("dd", {"iterations": 40, "batch_real": 64, "lr": 0.05}, 0.8),
        ("ratbptt", {"iterations": 40, "unroll": 10, "window": 5, "lr": 0.01, "batch_real": 64} | FAST, 0.7),
        (
            "atbptt",
            {"iterations": 40, "unroll": 10, "window": 5, "window_range": 2, "lr": 0.01, "batch_real": 64}
            | FAST,
            0.7,
        ),
    ],
)
def test_each_method_lowers_its_outer_loss_from_noise(digits, name, settings, ratio):
    method = get_method(name)
    history = method.distill(
        _inputs(digits, method.config_cls(**settings)), MemoryCheckpoints(), SILENT
    ).history
    losses = [h["loss"] for h in history]
    assert _falls(losses, ratio), losses


def test_learned_labels_move_and_are_stored_for_evaluation(digits):
    cfg = ratbptt.RaTBPTTConfig(iterations=6, unroll=6, window=3, batch_real=32, labels="learned", lr=0.01)
    result = ratbptt.distill(_inputs(digits, cfg), MemoryCheckpoints(), SILENT)
    start = ratbptt.initial_label_logits(result.labels, 10, 0.9)
    assert torch.softmax(start, 1)[0, 0].item() == pytest.approx(0.9)
    assert result.label_logits is not None and result.label_logits.shape == (10, 10)
    assert result.stats["label_logits_moved"] > 1e-3
    assert (result.label_logits - start).abs().max() > 1e-3


# ------------------------------------------------------------------ resume after a kill

TINY_RUN = [
    "compute.device=cpu",
    "dataset.train_per_class=20",
    "model.width=16",
    "distill.iterations=6",
    "distill.checkpoint_every=2",
    "distill.batch_real=32",
]
TINY_SETTINGS = {
    "dd": ["distill.init=known", "distill.networks=2"],
    "ratbptt": ["distill.unroll=6", "distill.window=3", "distill.labels=learned", "distill.memory=constant"],
    # Passes of 4 iterations: the kill after iteration 2 lands mid-pass, whose window must come back.
    "atbptt": ["distill.unroll=8", "distill.window=3", "distill.window_range=1", "distill.window_every=4"],
}


@pytest.mark.parametrize("name", ["dd", "ratbptt", "atbptt"])
def test_a_killed_run_resumes_and_matches_an_uninterrupted_run(tmp_path: Path, monkeypatch, name):
    cfg = load_config(f"digits-{name}", [*TINY_RUN, *TINY_SETTINGS[name]])
    store = Store(tmp_path)
    plan = plan_for(store, cfg)
    key = plan.keys["distill"]
    kill_distillation_at_first_checkpoint(store, cfg, plan, monkeypatch)
    assert not store.has("distill", key)
    notes = Notes()
    run_jobs(store, cfg, plan, {"distill"}, notes)
    label = {"dd": "DD", "ratbptt": "RaT-BPTT", "atbptt": "AT-BPTT"}[name]
    assert any(f"resuming {label} from checkpoint at iteration 2/6" in n for n in notes.lines)
    resumed = artifacts.load_synthetic(store, key)

    fresh = Store(tmp_path / "fresh")
    fresh_plan = plan_for(fresh, cfg)
    run_jobs(fresh, cfg, fresh_plan, {"distill"})
    uninterrupted = artifacts.load_synthetic(fresh, key)
    assert torch.isfinite(resumed.images).all()
    assert resumed.images.numpy().tobytes() == uninterrupted.images.numpy().tobytes()
    assert resumed.history == uninterrupted.history
    assert store.meta("distill", key)["stats"] == fresh.meta("distill", key)["stats"]
    if name == "ratbptt":
        assert resumed.label_logits.numpy().tobytes() == uninterrupted.label_logits.numpy().tobytes()


def test_divergence_stops_and_keeps_the_last_good_checkpoint(digits):
    cfg = ratbptt.RaTBPTTConfig(
        iterations=6, unroll=4, window=2, batch_real=32, lr=1e30, clip_ema=None, checkpoint_every=1
    )
    checkpoints = MemoryCheckpoints()
    with pytest.raises(
        DivergenceError, match="RaT-BPTT diverged at iteration .* last good checkpoint: iteration"
    ):
        ratbptt.distill(_inputs(digits, cfg), checkpoints, SILENT)
    assert checkpoints.state is not None and torch.isfinite(checkpoints.state["images"]).all()


# ------------------------------------------------------------------ end to end on digits


@pytest.mark.parametrize("name", ["dd", "ratbptt", "atbptt"])
def test_the_distilled_digits_beat_random_real_ones(tmp_path: Path, name):
    # The CPU recipe's distillation, evaluated by 2 networks (the random-real baseline by the same recipe).
    cfg = load_config(
        f"digits-{name}",
        ["compute.device=cpu", "evaluate.seeds=2", "evaluate.full_data=false", "evaluate.mask_ratios=[]"],
    )
    summary = run_pipeline(Store(tmp_path), cfg)
    distilled = summary["accuracy"]["convnet"]["mean"]
    random_real = summary["baselines"]["random_real"]["mean"]
    assert distilled > random_real + 5, (distilled, random_real)


def test_the_cpu_budgets_resolve_and_bad_settings_are_one_line_errors():
    for name in ("dd", "ratbptt", "atbptt"):
        for dataset in ("digits", "cifar10"):
            for ipc in (1, 10):
                assert load_config(f"{dataset}-{name}", [f"ipc={ipc}"]).method == name
    with pytest.raises(ConfigError, match="multiple of distill.images_per_step"):
        load_config("digits-dd", ["ipc=3", "distill.images_per_step=2"])
    with pytest.raises(ConfigError, match="must not exceed unroll"):
        load_config("digits-atbptt", ["distill.window=18", "distill.window_range=3"])


def test_rat_bptts_noise_start_has_unit_norm_images():
    images = bptt.unit_norm_noise((5, 1, 8, 8), torch.Generator().manual_seed(0))
    torch.testing.assert_close(images.flatten(1).norm(dim=1), torch.ones(5))
