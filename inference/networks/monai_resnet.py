"""The plain baseline: MONAI's ResNet (basic blocks), split into features / embedding / logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ResNet

from inference.networks.base import FeatureClassifier, stem_stride


class MonaiResNet(FeatureClassifier):
    """``monai.networks.nets.ResNet`` (2-D, basic blocks); small inputs drop the stem max-pool
    and use a 3x3 stem."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 3,
        input_size: int = 192,
        layers: Sequence[int] = (1, 1, 1, 1),
        block_inplanes: Sequence[int] = (32, 64, 128, 256),
    ) -> None:
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        small = stem_stride(input_size) == 2
        self.net = ResNet(
            block="basic",
            layers=list(layers),
            block_inplanes=list(block_inplanes),
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=3 if small else 7,
            conv1_t_stride=2,
            no_max_pool=small,
            num_classes=num_classes,
        )
        self.embedding_size = int(self.net.fc.in_features) if self.net.fc is not None else 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net.avgpool(features), 1)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        assert self.net.fc is not None
        return self.net.fc(embedding)
