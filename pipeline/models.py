"""Networks that output cluster probabilities: a dense one for segmentation, one for clustering.

Both have two heads, as in the reference: head ``"A"`` overclusters (more outputs than classes,
which helps the trunk learn) and head ``"B"`` has the true class count. Each head has
``n_subheads`` independent sub-heads; their spread over initialisations is what lets training pick
the best one without labels (the highest I(z, z'), i.e. the lowest lambda=1 loss).
``forward(x, head)`` returns one probability tensor per sub-head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet34

from pipeline.config import ModelConfig

Head = Literal["A", "B"]
SobelMode = Literal["none", "append", "replace"]

# (out_channels, dilation) or "M" for 2x2 max pooling: the reference's fully convolutional VGG.
VGG_SEGMENTATION = (64, 128, "M", 256, 256, (512, 2), (512, 2))


class Sobel(nn.Module):
    """Greyscale Sobel gradients of the colour channels, appended to or replacing them.

    The grey image is the mean of the first ``colour_channels`` bands; any further band (infrared)
    is kept as it is.

    Args:
        mode: ``"append"`` adds dx, dy after all bands; ``"replace"`` swaps the colour bands for
            dx, dy (extra bands stay).
        colour_channels: how many leading bands are colour.
    """

    def __init__(self, mode: SobelMode, colour_channels: int = 3):
        super().__init__()
        if mode not in ("append", "replace"):
            raise ValueError(f"Sobel mode must be 'append' or 'replace', got {mode!r}")
        self.mode, self.colour_channels = mode, colour_channels
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kernel", torch.stack([kx, kx.T]).unsqueeze(1), persistent=False)

    def extra_channels(self) -> int:
        """Change in channel count caused by this layer."""
        return 2 if self.mode == "append" else 2 - self.colour_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x[:, : self.colour_channels].mean(dim=1, keepdim=True)
        grads = F.conv2d(grey, self.kernel.to(grey.dtype), padding=1)
        if self.mode == "append":
            return torch.cat([x, grads], dim=1)
        return torch.cat([grads, x[:, self.colour_channels :]], dim=1)


def _conv_bn_relu(c_in: int, c_out: int, dilation: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


def _check_heads(n_clusters_a: int, n_clusters_b: int, n_subheads: int) -> None:
    for name, value in (
        ("n_clusters_a", n_clusters_a),
        ("n_clusters_b", n_clusters_b),
        ("n_subheads", n_subheads),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n_clusters_b < 2:
        raise ValueError(f"n_clusters_b must be at least 2 to cluster anything, got {n_clusters_b}")


class _TwoHeads(nn.Module):
    """What both networks share: the input check, the optional Sobel stage before the trunk, and
    the two heads of sub-heads."""

    in_channels: int
    sobel: Sobel | None
    trunk: nn.Module
    heads: nn.ModuleDict

    def _input_stage(self, in_channels: int, sobel: SobelMode) -> int:
        """Set up the input (bands, Sobel); returns the channel count the trunk receives."""
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels!r}")
        self.in_channels = in_channels
        self.sobel = None if sobel == "none" else Sobel(sobel, colour_channels=min(3, in_channels))
        return in_channels + (self.sobel.extra_channels() if self.sobel else 0)

    @staticmethod
    def _two_heads(
        layer: Callable[[int], nn.Module], n_clusters_a: int, n_clusters_b: int, n_subheads: int
    ) -> nn.ModuleDict:
        """Heads A and B of ``n_subheads`` sub-heads each; ``layer(k)`` makes one of k outputs."""
        return nn.ModuleDict(
            {
                "A": nn.ModuleList(layer(n_clusters_a) for _ in range(n_subheads)),
                "B": nn.ModuleList(layer(n_clusters_b) for _ in range(n_subheads)),
            }
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk features: (n, 512, H/2, W/2) for segmentation, (n, 512) for clustering
        (fewer channels with a narrower segmentation trunk)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (n, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return self.trunk(self.sobel(x) if self.sobel is not None else x)

    def _pick(self, head: Head) -> nn.ModuleList:
        if head not in ("A", "B"):
            raise ValueError(f"head must be 'A' or 'B', got {head!r}")
        return self.heads[head]


class SegmentationNet(_TwoHeads):
    """Fully convolutional VGG-style network with per-pixel softmax heads, as the reference
    implementation builds it for Potsdam and COCO-Stuff.

    3x3 conv + BN + ReLU with channels 64, 128, maxpool, 256, 256, 512 (dilation 2),
    512 (dilation 2); 1x1 conv heads at half resolution, softmax, bilinear upsampling to the
    input size (upsampling probabilities keeps them summing to 1).

    Args:
        in_channels: input bands: 3 for RGB or IR-R-G, 4 for RGBIR.
        n_clusters_a: outputs of head A (overclustering), e.g. 24 for Potsdam-3.
        n_clusters_b: outputs of head B, the class count.
        n_subheads: independent sub-heads per head.
        sobel: ``"none"``, ``"append"`` (colour + Sobel) or ``"replace"`` (Sobel only).
        width: channel multiplier of the trunk (1: the reference; 0.25 for CPU demos and tests).
    """

    def __init__(
        self,
        in_channels: int = 3,
        n_clusters_a: int = 24,
        n_clusters_b: int = 3,
        n_subheads: int = 1,
        sobel: SobelMode = "none",
        width: float = 1.0,
    ):
        super().__init__()
        _check_heads(n_clusters_a, n_clusters_b, n_subheads)
        c = self._input_stage(in_channels, sobel)
        layers: list[nn.Module] = []
        for spec in VGG_SEGMENTATION:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out, dilation = spec if isinstance(spec, tuple) else (spec, 1)
            out = max(8, round(out * width))
            layers += _conv_bn_relu(c, out, dilation)
            c = out
        self.trunk = nn.Sequential(*layers)
        self.heads = self._two_heads(
            lambda k: nn.Conv2d(c, k, 1), n_clusters_a, n_clusters_b, n_subheads
        )
        _kaiming_init(self)

    def forward(self, x: torch.Tensor, head: Head = "B") -> list[torch.Tensor]:
        """Per-pixel cluster probabilities, one (n, C, H, W) tensor per sub-head."""
        feats = self.features(x)
        size = x.shape[-2:]
        return [
            F.interpolate(
                sub(feats).softmax(dim=1), size=size, mode="bilinear", align_corners=False
            )
            for sub in self._pick(head)
        ]


def _small_trunk(in_channels: int) -> tuple[nn.Module, int]:
    # Paper Sec. 4.2: 4 conv layers (at most 512 features) separated by 3 max-pools.
    layers: list[nn.Module] = []
    c = in_channels
    for i, out in enumerate((64, 128, 256, 512)):
        if i:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        layers += _conv_bn_relu(c, out)
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c


def _resnet34_trunk(in_channels: int) -> tuple[nn.Module, int]:
    # ResNet-34 blocks with a 3x3 stride-1 stem and no max-pool, for 64-96 px inputs.
    # weights=None: never downloads anything.
    net = resnet34(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


class ClusterNet(_TwoHeads):
    """Whole-image clustering network: conv trunk, then linear softmax sub-heads.

    Args:
        in_channels: image bands (1 for digits/MNIST, 3 for STL-10).
        n_clusters_a: outputs of head A (overclustering).
        n_clusters_b: outputs of head B (class count).
        n_subheads: independent sub-heads per head.
        trunk: ``"small"`` (4 conv layers, any input from 8 px) or ``"resnet34"`` (64-96 px).
        sobel: as in SegmentationNet.
        input_size: side every image is rescaled to before the trunk (antialiased bilinear),
            as the reference rescales its crops (MNIST's 28 px to 24, STL-10's 96 to 64);
            0 takes images as they come.
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_clusters_a: int = 50,
        n_clusters_b: int = 10,
        n_subheads: int = 5,
        trunk: Literal["small", "resnet34"] = "small",
        sobel: SobelMode = "none",
        input_size: int = 0,
    ):
        super().__init__()
        _check_heads(n_clusters_a, n_clusters_b, n_subheads)
        if not isinstance(input_size, int) or input_size < 0:
            raise ValueError(f"input_size must be an integer >= 0, got {input_size!r}")
        self.input_size = input_size
        builders = {"small": _small_trunk, "resnet34": _resnet34_trunk}
        if trunk not in builders:
            raise ValueError(f"trunk must be one of {sorted(builders)}, got {trunk!r}")
        c = self._input_stage(in_channels, sobel)
        self.trunk, features = builders[trunk](c)
        self.heads = self._two_heads(
            lambda k: nn.Linear(features, k), n_clusters_a, n_clusters_b, n_subheads
        )
        if trunk == "small":
            _kaiming_init(self)
        else:
            _kaiming_init(self.heads)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        side = self.input_size
        if side and x.ndim == 4 and tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(
                x, size=(side, side), mode="bilinear", antialias=True, align_corners=False
            )
        return super().features(x)

    def forward(self, x: torch.Tensor, head: Head = "B") -> list[torch.Tensor]:
        """Cluster probabilities, one (n, C) tensor per sub-head."""
        feats = self.features(x)
        return [sub(feats).softmax(dim=1) for sub in self._pick(head)]


def build_model(cfg: ModelConfig) -> SegmentationNet | ClusterNet:
    """The network ``cfg`` describes, freshly initialised."""
    if cfg.task == "segmentation":
        return SegmentationNet(
            cfg.in_channels,
            cfg.n_clusters_a,
            cfg.n_clusters_b,
            cfg.n_subheads,
            cfg.sobel,
            cfg.width,
        )
    return ClusterNet(
        cfg.in_channels,
        cfg.n_clusters_a,
        cfg.n_clusters_b,
        cfg.n_subheads,
        cfg.trunk,
        cfg.sobel,
        cfg.input_size,
    )
