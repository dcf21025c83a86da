"""A small CNN with the convolution shapes pruning must handle: dense, depthwise, grouped, 1x1.

Random weights; input ``image`` (batch, 3, 32, 32), output ``logits`` (batch, 10). No real
image data ships offline, so its fidelity is measured on seeded random images.
"""

from __future__ import annotations

from pathlib import Path

from .zoo import ZooModel, export_torch, register


def _build_cnn(path: Path) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),                      # dense 3x3
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(),           # depthwise
        nn.Conv2d(32, 64, 1), nn.ReLU(),                                 # pointwise
        nn.Conv2d(64, 64, 3, padding=1, groups=4), nn.ReLU(),            # grouped, 16 per group
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    image = torch.randn(2, 3, 32, 32)
    export_torch(model, (image,), path, zoo_name="cnn", input_names=["image"],
                 output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))


CNN = register(ZooModel(
    name="cnn",
    description="small CNN, random weights: dense, depthwise, grouped and 1x1 convolutions, a linear head",
    kind="cnn", real_weights=False, version=1, builder=_build_cnn,
    inputs_note="seeded random images (no real images ship offline)",
    needs="pip install '.[models]'", size="92 KiB",
))
