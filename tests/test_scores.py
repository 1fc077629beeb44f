"""Fair scores against hand-computed values: DD-Ranking's formulas from fractions, ECE, temperature."""

import math

import pytest
import torch

from condense import scores


def test_label_robust_score_from_fractions_by_hand():
    # full data 90 and distilled 60 with hard labels; distilled 70 vs random real 50 in the recipe.
    found = scores.label_robust(distilled_hard=60.0, full_hard=90.0, distilled=70.0, random=50.0)
    assert found["hlr"] == pytest.approx(30.0)
    assert found["ior"] == pytest.approx(20.0)
    assert found["alpha"] == pytest.approx(0.5 * 0.20 - 0.5 * 0.30)  # -0.05: fractions, not -5 (percent)
    # (e^-0.05 - e^-1) / (e - e^-1) = (0.951229 - 0.367879) / 2.350402
    assert found["lrs"] == pytest.approx(0.248191, abs=1e-6)


def test_augmentation_robust_score_from_fractions_by_hand():
    found = scores.augmentation_robust(
        distilled_aug=70.0, random_aug=50.0, distilled_plain=40.0, random_plain=45.0
    )
    assert found["beta"] == pytest.approx(0.5 * 0.20 + 0.5 * -0.05)  # 0.075
    # (e^0.075 - e^-1) / (e - e^-1) = (1.077884 - 0.367879) / 2.350402
    assert found["ars"] == pytest.approx(0.302078, abs=1e-6)


def test_normalisation_maps_minus_one_to_zero_and_one_to_one():
    assert scores.normalised_exp(-1.0) == pytest.approx(0.0)
    assert scores.normalised_exp(1.0) == pytest.approx(1.0)


def _logits(probabilities: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_ece_on_a_constructed_case():
    # Two predictions at confidence 0.9 (one right, one wrong) and two at 0.6 (both right):
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.6| = 0.4, i.e. 40 %.
    logits = _logits([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])
    assert scores.expected_calibration_error(logits, labels) == pytest.approx(40.0)
    # Perfectly calibrated: confidence 0.75, three of four right.
    logits = _logits([[0.75, 0.25]] * 4)
    assert scores.expected_calibration_error(logits, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)


def test_temperature_fitted_on_held_out_recovers_the_overconfidence():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 5, generator=generator, dtype=torch.float64) * 1.5
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).flatten()
    overconfident = true_logits * 3  # a student three times too sure of itself
    assert scores.fit_temperature(overconfident[:10000], labels[:10000]) == pytest.approx(3.0, rel=0.05)
    found = scores.calibration(overconfident[10000:], labels[10000:], (overconfident[:10000], labels[:10000]))
    assert found["ece_scaled"] < found["ece"] / 3
    assert math.isfinite(found["temperature"])
    alone = scores.calibration(overconfident, labels, None)
    assert alone["temperature"] is None and alone["ece_scaled"] is None
    assert alone["ece"] == pytest.approx(scores.expected_calibration_error(overconfident, labels))


def _overconfident_model(generator: torch.Generator) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """A linear classifier four times too sure of itself, and held-out inputs with labels drawn from
    its own calibrated probabilities."""
    model = torch.nn.Linear(16, 5, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(5, 16, generator=generator, dtype=torch.float64) * 0.4)
        model.bias.zero_()
    x = torch.randn(4000, 16, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        y = torch.multinomial(torch.softmax(model(x), 1), 1, generator=generator).flatten()
        model.weight.mul_(4.0)
    return model, x, y


def test_masked_temperature_with_ratio_zero_is_plain_temperature_scaling():
    model, x, y = _overconfident_model(torch.Generator().manual_seed(0))
    with torch.no_grad():
        ratio, temperature = scores.masked_temperature(model, x, y, ratios=[0.0])
        assert ratio == 0.0 and temperature == scores.fit_temperature(model(x), y)


def test_masked_temperature_scaling_lowers_the_ece_of_an_overconfident_model():
    generator = torch.Generator().manual_seed(1)
    model, x, y = _overconfident_model(generator)
    test_x = torch.randn(4000, 16, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        test_y = torch.multinomial(torch.softmax(model(test_x) / 4.0, 1), 1, generator=generator).flatten()
        masked = scores.masked_temperature(model, x, y, ratios=[0.1, 0.3, 0.5, 0.7, 0.9])
        found = scores.calibration(model(test_x), test_y, (model(x), y), masked)
    assert found["mask_ratio"] in (0.1, 0.3, 0.5, 0.7, 0.9) and found["mask_temperature"] > 1.5
    assert found["ece_masked"] < found["ece"] / 2  # the overconfidence is mostly gone
    assert None not in (found["ece_scaled"], found["temperature"])
