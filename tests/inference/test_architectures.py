"""Every architecture: shapes at the three modalities' input sizes, Grad-CAM through Classifier,
the embedding it exposes, and that it learns (loss goes down on a batch it can memorise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference import Classifier, ModelCard
from inference.networks import ARCH_ALIASES, ARCHITECTURES, build_network, resolve_architecture

NEW_ARCHITECTURES = [name for name in ARCHITECTURES if name != "BusiCNN"]
# (in_channels, num_classes, input_size) of the US, SM and MG recipes
SHAPES = [(1, 3, 192), (3, 2, 50), (1, 3, 256)]


def _params(arch: str, channels: int, classes: int, size: int) -> dict[str, object]:
    params: dict[str, object] = {"in_channels": channels, "num_classes": classes}
    if arch != "BusiCNN":
        params["input_size"] = size
    return params


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}ch-{s[2]}px")
def test_shapes(arch: str, shape: tuple[int, int, int]) -> None:
    channels, classes, size = shape
    net = build_network(arch, _params(arch, channels, classes, size)).eval()
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        features = net.forward_features(x)  # type: ignore[operator]
        embedding = net.embed(features)  # type: ignore[operator]
        logits = net.classify(embedding)  # type: ignore[operator]
        direct = net(x)
    assert features.ndim == 4 and features.shape[0] == 3
    assert features.shape[2] >= 2 and features.shape[3] >= 2, "too coarse for a heatmap"
    assert embedding.shape == (3, net.embedding_size)  # type: ignore[union-attr]
    assert logits.shape == (3, classes)
    torch.testing.assert_close(direct, logits)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_grad_cam_points_at_the_evidence(arch: str) -> None:
    """Train each network for a few steps to tell images with a bright square (anywhere) from
    images without; its Grad-CAM of "square" must be hotter on the square than elsewhere."""
    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    size = 64
    net = build_network(arch, _params(arch, 1, 2, size))
    count = 32
    images = 0.4 * torch.randn(count, 1, size, size)
    targets = torch.zeros(count, dtype=torch.long)
    for i in range(1, count, 2):
        top, left = (int(v) for v in generator.integers(0, size - 16, size=2))
        images[i, 0, top : top + 16, left : left + 16] = 2.0
        targets[i] = 1
    # MobileNetV2 from scratch needs a larger step to learn this in 60 steps (measured)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2 if arch == "MobileNetV2" else 3e-3)
    net.train()
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(images), targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], f"{arch} did not learn: {losses[0]:.3f}, {losses[-1]:.3f}"
    # settle the BatchNorm running statistics on the training images (no weight update)
    with torch.no_grad():
        for _ in range(10):
            net(images)
    card = ModelCard.from_dict({
        "name": "t", "version": "0", "modality": "US", "architecture": arch,
        "labels": ["blank", "square"], "input_size": size, "in_channels": 1, "sha256": "0",
        "preprocessing_params": {"normalization": {"mean": [0.5], "std": [0.1 / 0.4]}},
    })
    classifier = Classifier(card, net)
    # The same kind of image as in training: a square in faint noise (0.1 -> ~25 grey levels).
    pixels = np.clip(generator.normal(128, 25, (size, size)), 0, 255).astype(np.uint8)
    pixels[40:56, 36:52] = 255
    prediction = classifier.predict(pixels)
    assert prediction.label == "square"
    heat = prediction.heatmap
    assert heat.shape == (size, size) and heat.min() >= 0.0 and heat.max() <= 1.0
    inside = np.zeros_like(heat, dtype=bool)
    inside[40:56, 36:52] = True
    assert heat[inside].mean() > heat[~inside].mean()
    assert prediction.embedding.shape == (net.embedding_size,)  # type: ignore[union-attr]


def test_aliases_resolve() -> None:
    for alias, name in ARCH_ALIASES.items():
        assert resolve_architecture(alias) == name
        assert resolve_architecture(name) == name
    with pytest.raises(ValueError, match="unknown architecture"):
        resolve_architecture("vgg16")
