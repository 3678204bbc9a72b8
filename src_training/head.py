"""DINO projection head and the multi-crop wrapper that runs a backbone over views of several sizes.

State-dict keys follow the official checkpoints: ``backbone.*`` for the ViT-4K and ``head.mlp.*``,
``head.last_layer.weight_g``, ``head.last_layer.weight_v`` for the head, so a saved student or teacher has
exactly the layout that ``load_dino_checkpoint`` (and HIPT/SLPD code) reads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output unit (``nn.utils.weight_norm``, dim 0).

    Written out so that the parameter names are the official ``weight_g``/``weight_v`` without the deprecated
    torch helper. With ``fix_norm`` the gain g stays 1 (DINO's ``norm_last_layer=True``).
    """

    def __init__(self, in_features: int, out_features: int, fix_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)  # nn.Linear's default initialization
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_norm)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP in_dim -> hidden -> ... -> bottleneck (GELU between), L2-normalize, weight-normalized last layer."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, out_dim], L2-normalized bottleneck [N, bottleneck_dim]); the latter is what is clustered."""
        bottleneck = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(bottleneck), bottleneck

    def forward_last_layer(self, z: torch.Tensor) -> torch.Tensor:
        """Prototype targets: L2-normalize a bottleneck-space vector and apply the last layer."""
        return self.last_layer(F.normalize(z, dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of views: one backbone pass per run of equal-sized views, one head pass."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: list[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(views, torch.Tensor):
            views = [views]
        outputs = []
        start = 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
                end += 1
            outputs.append(self.backbone(torch.cat(views[start:end])))
            start = end
        return self.head(torch.cat(outputs))

    def forward_last_layer(self, z: torch.Tensor) -> torch.Tensor:
        return self.head.forward_last_layer(z)
