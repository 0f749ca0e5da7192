"""A classifier: network, model card, preprocessing and Grad-CAM; pixels in, Prediction out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.card import ModelCard, sha256_file
from inference.networks import build_network
from inference.prediction import Prediction
from inference.transforms import normalize_transform, preprocess_transform


class FeatureNetwork(Protocol):
    """What Classifier needs of a network (``BusiCNN`` has it)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def embed(self, features: torch.Tensor) -> torch.Tensor: ...

    def classify(self, embedding: torch.Tensor) -> torch.Tensor: ...


class Classifier:
    """Classifies uint8 display images with one model.

    ``predict`` is deterministic (eval mode, no dropout, no randomness) and thread-compatible: it
    keeps no state between calls. It does not change torch's thread count; the caller decides.
    The heatmap is Grad-CAM of the predicted class on the network's last convolutional stage.
    """

    def __init__(self, card: ModelCard, network: nn.Module) -> None:
        for method in ("forward_features", "embed", "classify"):
            if not callable(getattr(network, method, None)):
                raise ValueError(f"network {type(network).__name__} has no {method}()")
        self.card = card
        network.eval()
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        self.module = network
        self.network = cast(FeatureNetwork, network)
        self._preprocess = preprocess_transform(card.input_size)
        self._normalize = normalize_transform()

    @classmethod
    def from_card(cls, card: ModelCard, weights: Path | None = None) -> Classifier:
        """Build the card's network and load its weights (``weights_only=True``).

        Raises ``ValueError`` if the weights file's SHA-256 differs from the card's, or the
        weights do not fit the architecture.
        """
        weights_path = weights if weights is not None else card.weights_path
        if weights_path is None:
            raise ValueError(f"model card {card.name} names no weights file")
        if not weights_path.is_file():
            raise ValueError(f"weights file {weights_path} of model {card.name} is missing")
        actual = sha256_file(weights_path)
        if actual != card.sha256:
            raise ValueError(
                f"weights {weights_path.name} have sha256 {actual}, but the card of "
                f"{card.name} {card.version} says {card.sha256}: refusing to load"
            )
        network = build_network(card.architecture, card.architecture_params)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"weights {weights_path.name} do not fit {card.architecture}") from exc
        return cls(card, network)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.card.labels

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """Display pixels -> the network's (1, S, S) input tensor."""
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 display pixels, got {array.dtype} "
                "(use inference.image_from_dataset for DICOM pixel data)"
            )
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ValueError(f"expected an image of shape (H, W) or (H, W, 3), got {array.shape}")
        tensor = torch.as_tensor(self._normalize(torch.as_tensor(self._preprocess(array))))
        return tensor.as_subclass(torch.Tensor).float()

    def predict(self, image: np.ndarray) -> Prediction:
        """Classify one uint8 image of shape (H, W) or (H, W, 3)."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[Prediction]:
        """Classify several images (any sizes); same results as ``predict`` one by one, up to
        floating-point rounding."""
        predictions: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            inputs = torch.stack([self.preprocess(image) for image in chunk])
            probabilities, embeddings, cams = self._forward(inputs)
            for index, image in enumerate(chunk):
                predictions.append(
                    self._prediction(probabilities[index], embeddings[index], cams[index], image)
                )
        return predictions

    def _forward(self, inputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """Probabilities, embeddings and low-resolution Grad-CAM maps of a batch.

        With a card asking for hflip test-time augmentation, logits and embeddings are averaged
        over the image and its mirror, and the mirror's Grad-CAM is flipped back and averaged.
        """
        count = inputs.shape[0]
        views = 2 if self.card.hflip_tta else 1
        if views == 2:
            inputs = torch.cat([inputs, torch.flip(inputs, dims=[3])])
        with torch.no_grad():
            features = self.network.forward_features(inputs)
        with torch.enable_grad():
            features = features.detach().requires_grad_(True)
            embedding = self.network.embed(features)
            logits = self.network.classify(embedding).view(views, count, -1).mean(dim=0)
            predicted = logits.argmax(dim=1)
            score = logits.gather(1, predicted[:, None]).sum()
            (gradients,) = torch.autograd.grad(score, features)
        with torch.no_grad():
            weights = gradients.mean(dim=(2, 3), keepdim=True)
            cams = F.relu((weights * features).sum(dim=1))
            if views == 2:
                cams = (cams[:count] + torch.flip(cams[count:], dims=[2])) / 2.0
            peak = cams.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
            cams = cams / peak
            probabilities = torch.softmax(logits / self.card.temperature, dim=1)
            mean_embedding = embedding.view(views, count, -1).mean(dim=0)
        return (
            probabilities.double().numpy(),
            mean_embedding.detach().float().numpy(),
            cams.detach(),
        )

    def _prediction(
        self, probabilities: np.ndarray, embedding: np.ndarray, cam: torch.Tensor, image: np.ndarray
    ) -> Prediction:
        height, width = int(image.shape[0]), int(image.shape[1])
        heatmap = F.interpolate(
            cam[None, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0]
        heatmap_array = np.clip(heatmap.numpy(), 0.0, 1.0).astype(np.float32)
        label_index = int(np.argmax(probabilities))
        label = self.labels[label_index]
        return Prediction(
            modality=self.card.modality,
            label=label,
            labels=self.labels,
            probabilities={
                name: float(p) for name, p in zip(self.labels, probabilities, strict=True)
            },
            model_name=self.card.name,
            model_version=self.card.version,
            model_sha256=self.card.sha256,
            heatmap=heatmap_array,
            embedding=np.ascontiguousarray(embedding, dtype=np.float32),
            extra={"heatmap": f"Grad-CAM of '{label}' on the last convolutional stage"},
        )
