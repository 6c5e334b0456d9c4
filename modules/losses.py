"""Losses shared by the two stages: the VAE's reconstruction losses (`Loss_type`), which the
end-to-end conditioner phase also uses through the frozen decoder, and the conditioner's loss."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from modules.config import LOSS_TYPES

RECON_LOSSES = {"MSE": F.mse_loss, "MAE": F.l1_loss, "SmoothL1": F.smooth_l1_loss, "Huber": F.huber_loss}
assert set(RECON_LOSSES) == set(LOSS_TYPES.values())


def latent_mse(main: torch.Tensor, hier: torch.Tensor, y_main: torch.Tensor,
               y_hier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE of the predicted main and hierarchical latents against their scaled targets."""
    return F.mse_loss(main.float(), y_main), F.mse_loss(hier.float(), y_hier)


def conditioner_loss(decoder: Callable | None, field_loss: Callable, latent_weight: float):
    """loss(net, batch) -> (loss, parts). Latent phase, batch (x, y_main, y_hier): the latent
    MSE, parts main and hier. End-to-end phase (`decoder` given), batch (x, y_main, y_hier,
    field): field_loss of the decoded field plus latent_weight × the latent MSE, parts field
    and latent."""
    def loss(net, batch):
        x, y_main, y_hier, *field = batch
        main, hier = net(x)
        lm, lh = latent_mse(main, hier, y_main, y_hier)
        if decoder is None:
            return lm + lh, {"main": lm, "hier": lh}
        fl = field_loss(decoder(main, hier).float(), field[0])
        return fl + latent_weight * (lm + lh), {"field": fl, "latent": lm + lh}
    return loss
