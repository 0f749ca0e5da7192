"""MONAI transforms for the classifiers: preprocessing (shared by training and inference),
optional Wiener denoising, normalisation, and training-time augmentation per modality.

Preprocessing of one display image (uint8, (H, W) or (H, W, 3)) for a card's settings:
``[BreastRegion]`` (mammograms: orient chest wall left, crop to the breast) ->
``AsGrayscaleChannelFirst`` or ``AsRGBChannelFirst`` -> ``Resize`` to ``size`` x ``size`` ->
``ScaleIntensityRange`` 0..255 to 0..1 -> ``[WienerDenoise]``, giving a (C, S, S) float32 tensor
in [0, 1]. ``normalize_transform`` (per-image z-score, or a fixed per-channel mean/std) runs
last, after any augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    NormalizeIntensity,
    RandAdjustContrast,
    RandAffine,
    RandCoarseDropout,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    RandRotate90,
    RandScaleIntensity,
    Resize,
    ScaleIntensityRange,
    Transform,
)
from scipy.signal import wiener

# ITU-R BT.601 luma weights, as Pillow's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _as_array(img: np.ndarray | torch.Tensor) -> np.ndarray:
    return img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)


def _check_size(height: int, width: int) -> None:
    if height < 2 or width < 2:
        raise ValueError(f"image too small to classify: {width}x{height}")


class AsGrayscaleChannelFirst(Transform):
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) pixels -> (1, H, W) float32 luma tensor.

    Values keep their scale (0..255 for uint8 input).
    """

    def __call__(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        array = _as_array(img)
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            gray = array[..., :3].astype(np.float32) @ _LUMA
        elif array.ndim == 3 and array.shape[-1] == 1:
            gray = array[..., 0].astype(np.float32)
        elif array.ndim == 2:
            gray = array.astype(np.float32)
        else:
            raise ValueError(
                f"expected an image of shape (H, W) or (H, W, 3), got {tuple(array.shape)}"
            )
        _check_size(*gray.shape)
        return torch.from_numpy(np.ascontiguousarray(gray))[None]


class AsRGBChannelFirst(Transform):
    """(H, W) or (H, W, 1|3|4) pixels -> (3, H, W) float32 tensor (grey is repeated)."""

    def __call__(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        array = _as_array(img)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        elif array.ndim == 3 and array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=2)
        elif not (array.ndim == 3 and array.shape[-1] in (3, 4)):
            raise ValueError(
                f"expected an image of shape (H, W) or (H, W, 3), got {tuple(array.shape)}"
            )
        _check_size(array.shape[0], array.shape[1])
        rgb = np.ascontiguousarray(array[..., :3].astype(np.float32).transpose(2, 0, 1))
        return torch.from_numpy(rgb)


class WienerDenoise(Transform):
    """Adaptive Wiener filter (``scipy.signal.wiener``) on each channel of a (C, H, W) image.

    The denoising step of the histopathology/ultrasound papers this project follows; switch it on
    with ``"wiener": true`` in a card's preprocessing to compare with and without.
    """

    def __init__(self, kernel: int = 3) -> None:
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError("the Wiener kernel size must be a positive odd number")
        self.kernel = kernel

    def __call__(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        array = _as_array(img).astype(np.float64)
        out = np.empty_like(array)
        for channel in range(array.shape[0]):
            plane = array[channel]
            if float(plane.std()) == 0.0:
                out[channel] = plane  # wiener divides by the local variance
            else:
                out[channel] = wiener(plane, (self.kernel, self.kernel))
        return torch.from_numpy(np.nan_to_num(out).astype(np.float32))


class BreastRegion(Transform):
    """Mammogram display pixels -> chest wall on the left, cropped to the breast (see mammo)."""

    def __call__(self, img: np.ndarray | torch.Tensor) -> np.ndarray:
        from inference.mammo import breast_region

        return breast_region(_as_array(img))


def preprocess_transform(
    size: int, channels: int = 1, *, wiener_kernel: int = 0, breast_crop: bool = False
) -> Compose:
    """Display pixels -> (channels, size, size) float32 tensor in [0, 1]."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    transforms: list[Any] = []
    if breast_crop:
        transforms.append(BreastRegion())
    transforms += [
        AsGrayscaleChannelFirst() if channels == 1 else AsRGBChannelFirst(),
        Resize((size, size), mode="bilinear", anti_aliasing=True),
        ScaleIntensityRange(a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
    ]
    if wiener_kernel:
        transforms.append(WienerDenoise(wiener_kernel))
    return Compose(transforms)


def normalize_transform(
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Compose:
    """The network's input: per-image zero mean and unit variance, or, when ``mean`` and ``std``
    are given (one value per channel, from the training split), a fixed standardisation that
    keeps stain intensity (histopathology)."""
    if mean is None or std is None:
        return Compose([NormalizeIntensity()])
    return Compose(
        [
            NormalizeIntensity(
                subtrahend=np.asarray(mean, dtype=np.float32),
                divisor=np.asarray(std, dtype=np.float32),
                channel_wise=True,
            )
        ]
    )


class RandStainJitter(Randomizable, Transform):
    """H&E colour jitter on a (3, H, W) image in [0, 1]: per-channel gain and bias, and a
    saturation change (the stain differences between labs and scanners)."""

    def __init__(self, prob: float = 0.8, gain: float = 0.08, bias: float = 0.04,
                 saturation: float = 0.2) -> None:
        self.prob, self.gain, self.bias, self.saturation = prob, gain, bias, saturation

    def __call__(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        tensor = torch.as_tensor(_as_array(img), dtype=torch.float32)
        if self.R.random_sample() >= self.prob:
            return tensor
        gains = 1.0 + self.R.uniform(-self.gain, self.gain, size=(3, 1, 1))
        biases = self.R.uniform(-self.bias, self.bias, size=(3, 1, 1))
        out = tensor * torch.as_tensor(gains, dtype=torch.float32) + torch.as_tensor(
            biases, dtype=torch.float32
        )
        grey = out.mean(dim=0, keepdim=True)
        factor = 1.0 + float(self.R.uniform(-self.saturation, self.saturation))
        return (grey + (out - grey) * factor).clamp(0.0, 1.0)


def augment_transform(size: int, cutout: bool = False, kind: str = "ultrasound") -> Compose:
    """Training-time augmentation of a preprocessed (C, size, size) image in [0, 1].

    ``ultrasound``: left-right flips only (the skin line stays at the top), small rotations,
    zoom and shifts, contrast/gamma, gain, blur, speckle-like noise, optional cutout.
    ``histopathology``: any flip and 90-degree rotation (a patch has no up), small affine, stain
    jitter, blur. ``mammography``: up-down flips (MLO views of either side after orientation),
    rotations, zoom, contrast, noise.
    """
    if kind == "histopathology":
        return Compose(
            [
                RandFlip(prob=0.5, spatial_axis=0),
                RandFlip(prob=0.5, spatial_axis=1),
                RandRotate90(prob=0.75, max_k=3),
                RandAffine(prob=0.3, rotate_range=np.deg2rad(10.0), scale_range=(0.1, 0.1),
                           padding_mode="reflection", mode="bilinear"),
                RandStainJitter(),
                RandGaussianSmooth(prob=0.1, sigma_x=(0.3, 0.8), sigma_y=(0.3, 0.8)),
            ]
        )
    shift = 0.06 * size
    spatial_axis = 0 if kind == "mammography" else 1
    transforms: list[Any] = [
        RandFlip(prob=0.5, spatial_axis=spatial_axis),
        RandAffine(
            prob=0.8,
            rotate_range=np.deg2rad(12.0),
            scale_range=(0.15, 0.15),
            translate_range=(shift, shift),
            padding_mode="zeros",
            mode="bilinear",
        ),
        RandAdjustContrast(prob=0.3, gamma=(0.7, 1.5)),
        RandScaleIntensity(prob=0.3, factors=0.2),
        RandGaussianSmooth(prob=0.15, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0)),
        RandGaussianNoise(prob=0.2, std=0.03),
    ]
    if cutout:
        transforms.append(
            RandCoarseDropout(
                holes=1,
                max_holes=3,
                spatial_size=size // 12,
                max_spatial_size=size // 5,
                fill_value=0.0,
                prob=0.25,
            )
        )
    return Compose(transforms)


class BatchHistologyAugment(Transform):
    """The histopathology augmentation on a whole (B, 3, H, W) batch in [0, 1] at once: the
    eight flips/rotations of the square (a patch has no up), per-image stain gain and bias per
    channel, and a saturation change. Vectorised, because per-patch transforms cost more than
    the network on 50 px patches."""

    def __init__(self, seed: int = 0, gain: float = 0.08, bias: float = 0.04,
                 saturation: float = 0.2) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.gain, self.bias, self.saturation = gain, bias, saturation

    def _uniform(self, shape: tuple[int, ...], spread: float) -> torch.Tensor:
        return (torch.rand(shape, generator=self.generator) * 2.0 - 1.0) * spread

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        count = batch.shape[0]
        out = batch.clone()
        for dims in ((3,), (2,)):
            chosen = torch.rand(count, generator=self.generator) < 0.5
            out[chosen] = out[chosen].flip(dims)
        if out.shape[2] == out.shape[3]:
            chosen = torch.rand(count, generator=self.generator) < 0.5
            out[chosen] = out[chosen].transpose(2, 3)
        out = out * (1.0 + self._uniform((count, 3, 1, 1), self.gain)) + self._uniform(
            (count, 3, 1, 1), self.bias
        )
        grey = out.mean(dim=1, keepdim=True)
        out = grey + (out - grey) * (1.0 + self._uniform((count, 1, 1, 1), self.saturation))
        return out.clamp(0.0, 1.0)


def standardize_batch(
    batch: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
) -> torch.Tensor:
    """``normalize_transform`` on a (B, C, H, W) batch: fixed per-channel mean/std, or each
    image to zero mean and unit variance."""
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=batch.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=batch.dtype).view(1, -1, 1, 1)
        return (batch - m) / s
    flat = batch.flatten(1)
    centred = batch - flat.mean(dim=1).view(-1, 1, 1, 1)
    return centred / flat.std(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)
