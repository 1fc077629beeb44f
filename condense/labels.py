"""Teacher soft labels: temperature-scaled class probabilities for the synthetic images."""

from __future__ import annotations

import torch
from torch import nn

from condense.training import predict


def soft_labels(teacher: nn.Module, images: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(teacher(x) / T), one row per image; rows sum to 1."""
    return torch.softmax(predict(teacher, images) / temperature, dim=1)


def kd_loss(logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD loss: KL(target || student at T), scaled by T^2 so gradients keep their size."""
    log_p = torch.log_softmax(logits / temperature, dim=1)
    return nn.functional.kl_div(log_p, target_probs, reduction="batchmean") * temperature**2
