"""Soft labels: a teacher's temperature-scaled class probabilities, and DATM's expert logits."""

from __future__ import annotations

import torch
from torch import nn

from condense.artifacts import ExpertBuffer
from condense.config import ModelConfig
from condense.models import CONVNET, FlatParams, build_model
from condense.prepare import RealData
from condense.training import predict


def soft_labels(teacher: nn.Module, images: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(teacher(x) / T), one row per image; rows sum to 1."""
    return torch.softmax(predict(teacher, images) / temperature, dim=1)


def kd_loss(logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD loss: KL(target || student at T), scaled by T^2 so gradients keep their size."""
    log_p = torch.log_softmax(logits / temperature, dim=1)
    return nn.functional.kl_div(log_p, target_probs, reduction="batchmean") * temperature**2


@torch.no_grad()
def expert_logits(experts: list[nn.Module], images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DATM's label initialisation: each image's logits averaged over the experts that classify it
    correctly (over all of them where none does)."""
    logits = torch.stack([predict(net, images) for net in experts])  # (experts, images, classes)
    correct = (logits.argmax(-1) == labels.to(logits.device)).float()
    weights = torch.where(correct.sum(0, keepdim=True) > 0, correct, torch.ones_like(correct))
    return (logits * weights[..., None]).sum(0) / weights.sum(0)[:, None]


def final_experts(buffer: ExpertBuffer, data: RealData, model_cfg: ModelConfig) -> list[nn.Module]:
    """Every expert at its last snapshot, as networks on the data's device."""
    device, last = data.device, buffer.num_snapshots - 1

    def network() -> nn.Module:
        return build_model(CONVNET, data.channels, data.num_classes, data.resolution, model_cfg).to(
            device, non_blocking=True
        )

    flat = FlatParams(network())
    return [flat.load_into(buffer.snapshot(e, last).to(device), network()) for e in range(buffer.num_experts)]
