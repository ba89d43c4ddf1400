"""The released PyTorch ClusterFormer classifier, transcribed for side-by-side timing (needs torch).

This is the anchor the performance issue measures against: the released mmcls model (commit 0c384d2
E-step over the K centers, raw NCHW reshapes, dense one-hot dispatch, GroupNorm(1) blocks, GAP neck over
the four normed stages, Linear head), written from ClusterFormer/ClusterFormer
``mmcls/models/backbones/cluster.py``. Module names follow the released state_dict keys, so
``load_state_dict(convert.mmcls_clusterformer.flax_to_state_dict(params))`` loads our parameters and
tests/test_torch_anchor.py checks that both compute the same logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

TINY = dict(
    depths=(2, 2, 6, 2),
    dims=(96, 192, 384, 768),
    mlp_ratios=(8, 8, 4, 4),
    heads=(3, 6, 12, 24),
    window_counts=(8, 4, 2, 1),
    num_iters=3,
)
SMALL = dict(TINY, depths=(2, 2, 18, 2), num_iters=1)
CONFIGS = {"clusterformer_tiny_official": TINY, "clusterformer_small_official": SMALL}


class Clustering(nn.Module):
    def __init__(
        self, dim: int, heads: int, head_dim: int = 32, windows: int = 1, centers=(10, 10), num_iters: int = 3
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.windows, self.centers, self.num_iters = (
            heads,
            head_dim,
            windows,
            centers,
            num_iters,
        )
        self.conv1 = nn.Conv2d(dim, inner, 1)
        self.conv_v = nn.Conv2d(dim, inner, 1)
        self.conv_f = nn.Conv2d(dim, inner, 1)
        self.conv_c = nn.Conv2d(head_dim, head_dim, 1)
        self.conv2 = nn.Conv2d(inner, dim, 1)
        self.sim_alpha = nn.Parameter(torch.ones(1))
        self.sim_beta = nn.Parameter(torch.zeros(1))
        self.centers_proposal = nn.AdaptiveAvgPool2d(centers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, feature, x = self.conv_v(x), self.conv_f(x), self.conv1(x)
        big_b, _, big_h, big_w = x.shape
        e = self.head_dim
        x = x.reshape(big_b * self.heads, e, big_h, big_w)
        value = value.reshape(big_b * self.heads, e, big_h, big_w)
        feature = feature.reshape(big_b * self.heads, e, big_h, big_w)
        if self.windows > 1:  # raw C-order chunks of each (e, H, W) buffer, not spatial windows
            n_h, n_w = big_h // self.windows, big_w // self.windows
            x = x.reshape(-1, e, n_h, n_w)
            value = value.reshape(-1, e, n_h, n_w)
            feature = feature.reshape(-1, e, n_h, n_w)
        b, c, w, h = x.shape
        value = value.reshape(b, w * h, c)
        centers = self.centers_proposal(x)
        k = self.centers[0] * self.centers[1]
        centers_feature = self.centers_proposal(feature).reshape(b, k, c)
        feature = feature.reshape(b, w * h, c)
        for _ in range(self.num_iters):  # E-step: softmax over the K centers; M-step: C = M F
            query = self.conv_c(centers).reshape(b, k, c)
            assign = (query @ value.transpose(1, 2)).softmax(dim=-2)
            centers = (assign @ feature).reshape(b, c, *self.centers)
        sim = torch.sigmoid(
            self.sim_beta
            + self.sim_alpha
            * (
                F.normalize(centers.reshape(b, c, -1).permute(0, 2, 1), dim=-1)
                @ F.normalize(x.reshape(b, c, -1).permute(0, 2, 1), dim=-1).transpose(-2, -1)
            )
        )
        _, index = sim.max(dim=1, keepdim=True)
        mask = torch.zeros_like(sim).scatter_(1, index, 1.0)
        sim = sim * mask
        out = ((feature.unsqueeze(1) * sim.unsqueeze(-1)).sum(dim=2) + centers_feature) / (
            mask.sum(dim=-1, keepdim=True) + 1.0
        )
        out = (out.unsqueeze(2) * sim.unsqueeze(-1)).sum(dim=1).reshape(b, c, w, h)
        if self.windows > 1:
            out = out.reshape(big_b * self.heads, c, big_h, big_w)
        return self.conv2(out.reshape(big_b, self.heads * c, big_h, big_w))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ClusterBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, **mixer):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.token_mixer = Clustering(dim, **mixer)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), 1e-5))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1[:, None, None] * self.token_mixer(self.norm1(x))
        return x + self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x))


class _Proj(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, kernel, stride, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Backbone(nn.Module):
    def __init__(
        self,
        depths: Sequence[int],
        dims: Sequence[int],
        mlp_ratios: Sequence[float],
        heads: Sequence[int],
        window_counts: Sequence[int],
        num_iters: int,
        head_dim: int = 32,
    ):
        super().__init__()
        self.patch_embed = _Proj(5, dims[0], 4, 4, 0)
        network = []
        for stage, depth in enumerate(depths):
            if stage:
                network.append(_Proj(dims[stage - 1], dims[stage], 3, 2, 1))
            network.append(
                nn.Sequential(
                    *(
                        ClusterBlock(
                            dims[stage],
                            mlp_ratios[stage],
                            heads=heads[stage],
                            head_dim=head_dim,
                            windows=window_counts[stage],
                            num_iters=num_iters,
                        )
                        for _ in range(depth)
                    )
                )
            )
        self.network = nn.ModuleList(network)
        for index, dim in zip((0, 2, 4, 6), dims):
            self.add_module(f"norm{index}", nn.GroupNorm(1, dim))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = images.shape
        rows = torch.arange(h, dtype=images.dtype) / (h - 1.0) - 0.5
        cols = torch.arange(w, dtype=images.dtype) / (w - 1.0) - 0.5
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=0).expand(b, 2, h, w)
        x = self.patch_embed(torch.cat([images, grid], dim=1))
        outs = []
        for index, layer in enumerate(self.network):
            x = layer(x)
            if index % 2 == 0:
                outs.append(getattr(self, f"norm{index}")(x))
        return outs


class _Head(nn.Module):
    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class ClusterFormer(nn.Module):
    """images (B, 3, H, W) -> logits; GAP of the four normed stages, concatenated, then Linear."""

    def __init__(self, num_classes: int = 1000, **backbone):
        super().__init__()
        self.backbone = Backbone(**backbone)
        self.head = _Head(sum(backbone["dims"]), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([s.mean(dim=(2, 3)) for s in self.backbone(images)], dim=1))


def create(name: str, **overrides) -> ClusterFormer:
    """``name`` in CONFIGS (the registry names of the official-parity presets)."""
    config = dict(CONFIGS[name], **overrides)
    num_classes = config.pop("num_classes", 1000)
    return ClusterFormer(num_classes, **config)
