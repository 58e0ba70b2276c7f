"""Post-hoc class-temperature calibration (temperature scaling) for margin-trained models.

``sll-*`` class heads output ``logits = tau_k * z`` with a learnt temperature ``tau_k`` per scale.
The certified class radius ``(z_top - z_second) / sqrt(2)`` does not depend on ``tau_k``, but the
detection scores ``softmax(tau_k * z)`` do: under the Lipschitz-margin loss the temperature grows
through training (the margin ``sqrt(2) * eps * tau_k`` follows it), and a temperature in the
thousands saturates every confident score at 1.0, so detections can no longer be ranked
(docs/results/beat-the-seed.md). Refitting ``tau_k`` alone -- maximum likelihood of the plain
cross-entropy on the training loss's anchors (positives and mined hard negatives), the network's
``z`` held fixed -- gives the scores back their ranking and leaves every certificate unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lipdet.loss import hard_negatives, match_targets


def learnt_temperature_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(tap, head)]`` of the class heads with a learnt temperature (``log_temperature``), map order."""
    heads = getattr(model, "cls_heads", None)
    if heads is None:
        return []
    return [(t, heads[t]) for t in model.taps if getattr(heads[t], "log_temperature", None) is not None]


@torch.no_grad()
def pre_temperature_logits(model: nn.Module, dataset: Any, limit: int, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """``z (N, P, C)`` = logits / tau and the matched classes ``(N, P)`` of the first ``limit`` items."""
    was_training = model.training
    model.eval()
    device = model.priors.device
    tau = model.prior_temperatures().view(1, -1, 1)
    priors = model.priors.cpu()
    zs, classes = [], []
    n = min(limit, len(dataset))
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([it[0] for it in items]).to(device)
        _, logits = model(images)
        zs.append((logits.float() / tau).cpu())
        targets = [{"boxes": it[1]["boxes"], "labels": it[1]["labels"]} for it in items]
        classes.append(match_targets(targets, priors, model.config.input_size)[1])
    model.train(was_training)
    return torch.cat(zs), torch.cat(classes)


def fit_class_temperatures(
    model: nn.Module, dataset: Any, limit: int = 256, steps: int = 150, lr: float = 0.1, start_max: float = 100.0
) -> dict[str, Any]:
    """Refit the learnt class temperatures of ``model`` in place (see the module notes).

    Args:
        dataset: items ``(image (3, S, S), {"boxes", "labels"})``, e.g. the training split.
        limit: images used (their ``z`` are computed once).
        steps, lr: Adam on ``log tau_k``, started from ``min(tau_k, start_max)``.

    Returns:
        ``{"before": [tau_k], "after": [tau_k], "nll_before", "nll_after", "images"}`` (map order;
        unchanged and ``"skipped"`` when no head has a learnt temperature).
    """
    heads = learnt_temperature_heads(model)
    before = [float(h.temperature()) for _, h in heads]
    if not heads:
        return {"skipped": "no learnt class temperature", "before": [], "after": []}
    z, cls_t = pre_temperature_logits(model, dataset, limit)
    pos = cls_t > 0
    scale_of_prior = model.prior_spec.map_index()
    learnt = {t for t, _ in heads}
    mask = torch.tensor([t in learnt for t in model.taps])
    tau0 = torch.tensor([float(model.cls_heads[t].temperature()) for t in model.taps])
    log_tau = tau0.clamp(max=start_max).log().requires_grad_(True)
    num_pos = pos.sum().clamp_min(1).float()

    def nll(lt: Tensor) -> Tensor:
        tau = torch.where(mask, lt.exp(), tau0)[scale_of_prior].view(1, -1, 1)
        logits = tau * z
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), cls_t.reshape(-1),
                                         reduction="none").view_as(cls_t)
        return ce[pos | hard_negatives(ce, pos)].sum() / num_pos

    with torch.no_grad():
        nll_before = float(nll(tau0.log()))
    opt = torch.optim.Adam([log_tau], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = nll(log_tau)
        loss.backward()
        opt.step()
    with torch.no_grad():
        nll_after = float(nll(log_tau))
        fitted = log_tau.detach()
        for k, t in enumerate(model.taps):
            if t in learnt:
                model.cls_heads[t].log_temperature.copy_(fitted[k].to(model.cls_heads[t].log_temperature))
    return {"before": before, "after": [float(h.temperature()) for _, h in heads], "nll_before": nll_before,
            "nll_after": nll_after, "images": int(z.shape[0])}
