"""Fair scores of a distilled set: DD-Ranking's label- and augmentation-robust scores computed the
right way, and the calibration of the students trained on it.

DD-Ranking (Li et al. 2025, arXiv 2505.13300) defines, with accuracies as **fractions** in [0, 1]:

- hard-label recovery ``HLR = Acc(full data, hard) - Acc(distilled, hard)`` (lower is better);
- improvement over random ``IOR = Acc(distilled) - Acc(random real)``, same labels and recipe;
- ``alpha = w * IOR - (1 - w) * HLR`` (``w = 0.5``), label-robust score
  ``LRS = (e^alpha - e^-1) / (e - e^-1)``, which maps ``alpha`` in [-1, 1] onto [0, 1];
- ``beta = g * (Acc(distilled, aug) - Acc(random, aug)) + (1 - g) * (Acc(distilled, no aug) -
  Acc(random, no aug))`` (``g = 0.5``), augmentation-robust score ``ARS`` normalised the same way.

The package itself feeds percentages into these formulas, so its alpha leaves [-1, 1] and its
"normalised" scores leave [0, 1]; here every accuracy is divided by 100 first. Differences (HLR,
IOR) are reported in percentage points, the two scores in [0, 1].

Calibration: the expected calibration error (ECE, Guo et al. 2017: 15 equal-width confidence bins,
``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|``) of a student's test predictions, and the ECE after
temperature scaling with the temperature fitted (by NLL) on a calibration split held out of the
training data, never on the test set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

ECE_BINS = 15
LABEL_WEIGHT = 0.5
"""DD-Ranking's ``w``: the weight of IOR against HLR in the label-robust score."""
AUGMENT_WEIGHT = 0.5
"""DD-Ranking's ``gamma``: the weight of the augmented recipe against the plain one."""


def normalised_exp(x: float) -> float:
    """DD-Ranking's map of [-1, 1] onto [0, 1]: ``(e^x - e^-1) / (e - e^-1)``."""
    return (math.exp(x) - math.exp(-1)) / (math.e - math.exp(-1))


def label_robust(
    distilled_hard: float, full_hard: float, distilled: float, random: float, weight: float = LABEL_WEIGHT
) -> dict[str, float]:
    """HLR and IOR (percentage points) and LRS in [0, 1], from accuracies in percent."""
    hlr = full_hard - distilled_hard
    ior = distilled - random
    alpha = weight * ior / 100 - (1 - weight) * hlr / 100
    return {"hlr": hlr, "ior": ior, "alpha": alpha, "lrs": normalised_exp(alpha)}


def augmentation_robust(
    distilled_aug: float,
    random_aug: float,
    distilled_plain: float,
    random_plain: float,
    weight: float = AUGMENT_WEIGHT,
) -> dict[str, float]:
    """ARS in [0, 1] from accuracies in percent, with and without the recipe's augmentation."""
    beta = weight * (distilled_aug - random_aug) / 100 + (1 - weight) * (distilled_plain - random_plain) / 100
    return {"beta": beta, "ars": normalised_exp(beta)}


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in percent: confidence (max softmax probability) in ``bins`` equal-width bins over (0, 1]."""
    probs = torch.softmax(logits.detach().double().cpu(), dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels.cpu()).double()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; confidence is never 0 (at least 1/classes).
    index = (torch.ceil(confidence * bins) - 1).clamp(0, bins - 1).long()
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    return float((conf_sum - acc_sum).abs().sum() / len(labels) * 100)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 80) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)``.

    The NLL is convex in ``1/T`` (a log-sum-exp of linear functions), hence unimodal in ``log T``:
    a golden-section search over ``T`` in [0.01, 100] finds it deterministically."""
    z, y = logits.detach().double().cpu(), labels.long().cpu()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    lo, hi = math.log(0.01), math.log(100.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def masked_temperature(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    ratios: Sequence[float],
    seed: int = 0,
    clean: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Masked temperature scaling (Zhu et al., ICCV 2023): for each ratio t, fit the temperature by
    NLL on the logits of the held-out images ``x`` with each input value zeroed with probability t
    (a Bernoulli mask, as the authors' code: ``x * (rand_like(x) > t)``); keep the t whose
    temperature gives the lowest ECE on the same held-out images unmasked. Returns (t, T).

    Deviation: the released code picks t by the ECE on the test set; here t is picked on the held-out
    split, and the test split is never read. With the single ratio 0 this is plain temperature
    scaling. One mask per ratio, drawn from ``seed``: the choice is deterministic. ``clean``: the
    logits of ``x`` when the caller has them already."""
    clean = predict(x) if clean is None else clean
    best: tuple[float, float, float] | None = None
    for ratio in ratios:
        generator = torch.Generator().manual_seed(seed)
        keep = (torch.rand(x.shape, generator=generator) >= ratio).to(x.device, x.dtype)
        temperature = fit_temperature(predict(x * keep), y)
        error = expected_calibration_error(clean / temperature, y)
        if best is None or error < best[0]:
            best = (error, ratio, temperature)
    if best is None:
        raise ValueError("masked temperature scaling needs at least one mask ratio")
    return best[1], best[2]


def calibration(
    test_logits: torch.Tensor,
    test_labels: torch.Tensor,
    held_out: tuple[torch.Tensor, torch.Tensor] | None,
    masked: tuple[float, float] | None = None,
) -> dict[str, float | None]:
    """ECE of the test predictions, after temperature scaling fitted on ``held_out`` (logits and
    labels of training images the student did not train on), and after masked temperature scaling
    (``masked``: its (t, T), see :func:`masked_temperature`); None where nothing was held out."""
    found: dict[str, float | None] = {
        "ece": expected_calibration_error(test_logits, test_labels),
        "temperature": None,
        "ece_scaled": None,
        "mask_ratio": None,
        "mask_temperature": None,
        "ece_masked": None,
    }
    if held_out is not None and len(held_out[1]) > 0:
        temperature = fit_temperature(*held_out)
        found["temperature"] = temperature
        found["ece_scaled"] = expected_calibration_error(test_logits / temperature, test_labels)
    if masked is not None:
        found["mask_ratio"], found["mask_temperature"] = masked
        found["ece_masked"] = expected_calibration_error(test_logits / masked[1], test_labels)
    return found


def summarize(accuracies: list[float]) -> dict[str, float | list[float]]:
    """Mean, population std and the runs of some accuracies (percent), rounded to 2 digits."""
    t = torch.tensor(accuracies, dtype=torch.float64)
    std = float(t.std(unbiased=False)) if len(accuracies) > 1 else 0.0
    return {
        "mean": round(float(t.mean()), 2),
        "std": round(std, 2),
        "runs": [round(a, 2) for a in accuracies],
    }
