"""A classifier: network, model card, preprocessing and Grad-CAM; pixels in, Prediction out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.backends import FeatureFunction, compile_features
from inference.card import ModelCard, sha256_file
from inference.datasets import pad_to
from inference.mammo import breast_bbox, chest_wall_on_right
from inference.networks import build_network
from inference.ood import MahalanobisScorer
from inference.prediction import Prediction
from inference.stages import stage
from inference.transforms import normalize_transform, preprocess_transform


class FeatureNetwork(Protocol):
    """What Classifier needs of a network (``BusiCNN`` has it)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def embed(self, features: torch.Tensor) -> torch.Tensor: ...

    def classify(self, embedding: torch.Tensor) -> torch.Tensor: ...


def frozen_network(network: nn.Module) -> nn.Module:
    """``network`` in eval mode with its parameters frozen; ValueError unless it has the
    ``forward_features`` / ``embed`` / ``classify`` split every served network has."""
    for method in ("forward_features", "embed", "classify"):
        if not callable(getattr(network, method, None)):
            raise ValueError(f"network {type(network).__name__} has no {method}()")
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network


class Classifier:
    """Classifies uint8 display images with one model.

    ``predict`` is deterministic (eval mode, no dropout, no randomness) and thread-compatible: it
    keeps no state between calls. It does not change torch's thread count; the caller decides.
    The heatmap is Grad-CAM of the predicted class on the network's last convolutional stage.
    """

    def __init__(
        self, card: ModelCard, network: nn.Module, ood_scorer: MahalanobisScorer | None = None
    ) -> None:
        self.card = card
        self.module = frozen_network(network)
        self.network = cast(FeatureNetwork, network)
        params = card.preprocessing_params
        self._breast_crop = bool(params["breast_crop"])
        self._pad_to = int(params["pad_to"])
        self._preprocess = preprocess_transform(
            card.input_size, int(params["channels"]), wiener_kernel=int(params["wiener_kernel"])
        )
        normalization = params["normalization"]
        if isinstance(normalization, dict):
            self._normalize = normalize_transform(normalization["mean"], normalization["std"])
        else:
            self._normalize = normalize_transform()
        self.ood_scorer = ood_scorer
        self.ood_threshold = float(card.ood.get("threshold", math.inf))
        # the trunk's forward pass: eager unless with_backend() chose another (inference.backends)
        self.backend = "eager"
        self._features: FeatureFunction = self.network.forward_features

    def with_backend(self, backend: str) -> Classifier:
        """Run the convolutional trunk through ``backend`` (eager, torchscript, onnx); the head
        and Grad-CAM stay eager. Returns self."""
        channels = int(self.card.preprocessing_params["channels"])
        size = int(self.card.input_size)
        example = torch.zeros(1, channels, size, size)
        self._features = compile_features(self.module, backend, example)
        self.backend = backend
        return self

    @classmethod
    def from_card(cls, card: ModelCard, weights: Path | None = None) -> Self:
        """Build the card's network and load its weights (``weights_only=True``); subclasses
        (``MammoPatchClassifier``) are built the same way.

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
        scorer = None
        ood_path = card.ood_path if weights is None else weights.with_name(
            str(card.ood.get("file", ""))) if card.ood.get("file") else None
        if ood_path is not None:
            if not ood_path.is_file():
                raise ValueError(f"OOD statistics {ood_path} of model {card.name} are missing")
            expected = str(card.ood.get("sha256", "")).lower()
            if sha256_file(ood_path) != expected:
                raise ValueError(
                    f"OOD statistics {ood_path.name} do not match the card of {card.name}: "
                    "refusing to load"
                )
            scorer = MahalanobisScorer.load(ood_path)
        return cls(card, network, scorer)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.card.labels

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """Display pixels -> the network's (C, S, S) input tensor."""
        return self._preprocess_with_geometry(image)[0]

    def _preprocess_with_geometry(self, image: np.ndarray) -> tuple[torch.Tensor, _Geometry]:
        """The input tensor, and where it came from in ``image`` (for placing the heatmap)."""
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 display pixels, got {array.dtype} "
                "(use inference.image_from_dataset for DICOM pixel data)"
            )
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ValueError(f"expected an image of shape (H, W) or (H, W, 3), got {array.shape}")
        geometry = _Geometry(flipped=False, box=(0, 0, array.shape[0], array.shape[1]))
        if self._pad_to and min(array.shape[:2]) < self._pad_to:
            # Edge patches, padded white as in training; the heatmap covers the real part.
            padded = pad_to(array, self._pad_to)
            scale_h, scale_w = padded.shape[0], padded.shape[1]
            tensor = torch.as_tensor(self._normalize(torch.as_tensor(self._preprocess(padded))))
            geometry = _Geometry(flipped=False, box=(0, 0, scale_h, scale_w))
            return tensor.as_subclass(torch.Tensor).float(), geometry
        if self._breast_crop:
            flipped = chest_wall_on_right(array)
            oriented = array[:, ::-1] if flipped else array
            box = breast_bbox(oriented)
            geometry = _Geometry(flipped=flipped, box=box)
            array = np.ascontiguousarray(oriented[box[0] : box[2], box[1] : box[3]])
        tensor = torch.as_tensor(self._normalize(torch.as_tensor(self._preprocess(array))))
        return tensor.as_subclass(torch.Tensor).float(), geometry

    def predict(self, image: np.ndarray) -> Prediction:
        """Classify one uint8 image of shape (H, W) or (H, W, 3)."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[Prediction]:
        """Classify several images (any sizes); same results as ``predict`` one by one, up to
        floating-point rounding."""
        predictions: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start : start + batch_size])
            with stage("preprocess"):
                prepared = [self._preprocess_with_geometry(image) for image in chunk]
                inputs = torch.stack([tensor for tensor, _ in prepared])
            probabilities, embeddings, cams = self._forward(inputs)
            scores = (
                self.ood_scorer.score(embeddings) if self.ood_scorer is not None
                else [None] * len(chunk)
            )
            for index, image in enumerate(chunk):
                with stage("gradcam"):  # the heatmap upsampled to the image
                    predictions.append(
                        self._prediction(
                            probabilities[index], embeddings[index], cams[index], image,
                            prepared[index][1], scores[index],
                        )
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
        with stage("model"), torch.no_grad():
            features = self._features(inputs)
        with stage("model"), torch.enable_grad():
            features = features.detach().requires_grad_(True)
            embedding = self.network.embed(features)
            logits = self.network.classify(embedding).view(views, count, -1).mean(dim=0)
            predicted = logits.argmax(dim=1)
            score = logits.gather(1, predicted[:, None]).sum()
        with stage("gradcam"), torch.enable_grad():
            (gradients,) = torch.autograd.grad(score, features)
        with stage("gradcam"), torch.no_grad():
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
        self,
        probabilities: np.ndarray,
        embedding: np.ndarray,
        cam: torch.Tensor,
        image: np.ndarray,
        geometry: _Geometry,
        ood_score: float | None,
    ) -> Prediction:
        height, width = int(image.shape[0]), int(image.shape[1])
        top, left, bottom, right = geometry.box
        region = F.interpolate(
            cam[None, None], size=(bottom - top, right - left), mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
        canvas = np.zeros((max(height, bottom), max(width, right)), dtype=np.float32)
        canvas[top:bottom, left:right] = np.clip(region, 0.0, 1.0)
        heatmap_array = np.ascontiguousarray(canvas[:height, :width])
        if geometry.flipped:
            heatmap_array = np.ascontiguousarray(heatmap_array[:, ::-1])
        label_index = int(np.argmax(probabilities))
        label = self.labels[label_index]
        pixels = np.asarray(image)
        no_contrast = int(pixels.max()) - int(pixels.min()) < 4
        score = None if ood_score is None else float(ood_score)
        not_assessable = no_contrast or (score is not None and score > self.ood_threshold)
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
            ood_score=score,
            not_assessable=not_assessable,
            extra={"heatmap": f"Grad-CAM of '{label}' on the last convolutional stage"},
        )


@dataclass(frozen=True)
class _Geometry:
    """Where the network's input came from: flipped left-right, then cropped to ``box``
    (top, left, bottom, right) of the flipped image."""

    flipped: bool
    box: tuple[int, int, int, int]
