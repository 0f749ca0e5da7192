"""MONAI transforms for the classifiers: preprocessing (shared by training and inference) and
training-time augmentation.

Preprocessing of one display image (uint8, (H, W) or (H, W, 3)):
``AsGrayscaleChannelFirst`` -> ``Resize`` to ``size`` x ``size`` (aspect ratio not kept, as the
BUSI release itself was resized) -> ``ScaleIntensityRange`` 0..255 to 0..1, giving a (1, S, S)
float32 tensor in [0, 1]. ``normalize_transform`` (per-image z-score) runs last, after any
augmentation.
"""

from __future__ import annotations

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
    RandScaleIntensity,
    Resize,
    ScaleIntensityRange,
    Transform,
)

# ITU-R BT.601 luma weights, as Pillow's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class AsGrayscaleChannelFirst(Transform):
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) pixels -> (1, H, W) float32 luma tensor.

    Values keep their scale (0..255 for uint8 input).
    """

    def __call__(self, img: np.ndarray | torch.Tensor) -> torch.Tensor:
        array = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
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
        if gray.shape[0] < 2 or gray.shape[1] < 2:
            raise ValueError(f"image too small to classify: {gray.shape[1]}x{gray.shape[0]}")
        return torch.from_numpy(np.ascontiguousarray(gray))[None]


def preprocess_transform(size: int) -> Compose:
    """Display pixels -> (1, size, size) float32 tensor in [0, 1]."""
    return Compose(
        [
            AsGrayscaleChannelFirst(),
            Resize((size, size), mode="bilinear", anti_aliasing=True),
            ScaleIntensityRange(a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        ]
    )


def normalize_transform() -> Compose:
    """Per-image zero mean, unit variance (the network's input)."""
    return Compose([NormalizeIntensity()])


def augment_transform(size: int, cutout: bool = False) -> Compose:
    """Training-time augmentation of a preprocessed (1, size, size) image in [0, 1].

    Left-right flips only (the skin line stays at the top of an ultrasound image), small
    rotations, zoom and shifts, contrast/gamma, gain, blur, speckle-like noise and a few
    blacked-out rectangles (``cutout``; off by default: it did not help on BUSI validation).
    """
    shift = 0.06 * size
    transforms: list[Transform] = [
        RandFlip(prob=0.5, spatial_axis=1),
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
