"""Whole-slide analysis: tissue -> tiles at the patch model's spacing -> tile map + slide result.

Spacing. The IDC patches the SM patch model learns from are 50 x 50 pixels cut from slides
scanned at 40x (about 0.25 µm/pixel) and downsampled 16:1 to an apparent 2.5x, i.e. about
4 µm/pixel (Cruz-Roa et al. 2014; Janowczyk & Madabhushi 2016): each patch covers
200 x 200 µm of tissue. So slides are tiled into 200 µm squares read at 4 µm/pixel
(``ANALYSIS_MPP``): from the coarsest pyramid level no coarser than 4 µm/pixel (up to 25% coarser
is accepted), each tile resized to 50 x 50 pixels when that level is not exactly 4 µm/pixel.

Streaming. Tissue is found on a low-resolution image (``TISSUE_MPP`` = 50 µm/pixel, 4 x 4 pixels
per tile). The tissue tiles are then read block by block (``block_tiles`` x ``block_tiles`` tiles
per wsidicom read), classified in batches of one fixed size (``_TileBatches``: the network's
memory grows with every new input shape), and reduced at once into the tile-probability grid
(one float per tile) and the attention pool; neither the level nor the tiles' embeddings are
ever held whole.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from inference.classifier import Classifier
from inference.transforms import _LUMA
from inference.wsi.aggregator import SlideAggregator
from inference.wsi.slide import PyramidLevel, SlideError, WholeSlide
from inference.wsi.tissue import tissue_mask

ANALYSIS_MPP = 4.0
TILE_PIXELS = 50
TILE_UM = ANALYSIS_MPP * TILE_PIXELS
TISSUE_MPP = TILE_UM / 4.0
POSITIVE_LABELS = ("idc", "malignant", "tumour", "tumor")
TOP_K_FRACTION = 0.01
RULE_NAME = "mean of the top 1% tile probabilities (non-learned rule)"


def positive_label(labels: tuple[str, ...]) -> str:
    """The tumour class of a patch model's labels (``idc``), else its last label."""
    for label in labels:
        if label.lower() in POSITIVE_LABELS:
            return label
    return labels[-1]


@dataclass
class SlideAnalysis:
    """What the pipeline found on one slide.

    ``probability_map`` has one value per 200 µm tile (rows x cols of the tile grid), the tumour
    probability of tissue tiles and NaN elsewhere; ``tissue`` marks the tiles analysed.
    """

    labels: tuple[str, ...]
    positive_label: str
    tile_um: float
    analysis_mpp: float
    level: PyramidLevel
    tissue: npt.NDArray[np.bool_]
    probability_map: npt.NDArray[np.float32]
    threshold: float
    slide_probabilities: dict[str, float]
    aggregator: str
    aggregator_version: str | None
    thumbnail: npt.NDArray[np.uint8]
    thumbnail_mpp: float
    saturation_threshold: float
    embedding: npt.NDArray[np.float32]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tissue_tiles(self) -> int:
        return int(self.tissue.sum())

    @property
    def positive_tiles(self) -> int:
        return int(np.nansum(self.probability_map >= self.threshold))

    @property
    def positive_fraction(self) -> float:
        """Tumour-positive tiles / tissue tiles (0 when there is no tissue)."""
        return self.positive_tiles / self.tissue_tiles if self.tissue_tiles else 0.0

    @property
    def tile_area_mm2(self) -> float:
        return (self.tile_um / 1000.0) ** 2

    @property
    def tissue_area_mm2(self) -> float:
        return self.tissue_tiles * self.tile_area_mm2

    @property
    def positive_area_mm2(self) -> float:
        return self.positive_tiles * self.tile_area_mm2

    @property
    def positive_mask(self) -> npt.NDArray[np.bool_]:
        return np.nan_to_num(self.probability_map, nan=0.0) >= self.threshold

    def heatmap(self) -> npt.NDArray[np.float32]:
        """The tile map at the thumbnail's size (nearest tile), 0 outside tissue."""
        height, width = self.thumbnail.shape[:2]
        grid = np.nan_to_num(self.probability_map, nan=0.0).astype(np.float32)
        # the grid covers whole tiles, which can overhang the slide's right and bottom edges
        scale = self.tile_um / self.thumbnail_mpp
        rows = np.minimum((np.arange(height) / scale).astype(int), grid.shape[0] - 1)
        cols = np.minimum((np.arange(width) / scale).astype(int), grid.shape[1] - 1)
        return np.ascontiguousarray(grid[rows][:, cols], dtype=np.float32)


def _tile_grid(level: PyramidLevel, tile_um: float) -> tuple[int, int, float]:
    """Rows, cols and the tile side in pixels of ``level``."""
    side = tile_um / level.mpp
    rows = max(1, math.ceil(level.height / side - 1e-6))
    cols = max(1, math.ceil(level.width / side - 1e-6))
    return rows, cols, side


def _tissue_fraction(
    mask: npt.NDArray[np.bool_], mask_mpp: float, rows: int, cols: int, tile_um: float
) -> npt.NDArray[np.float32]:
    """Fraction of each tile covered by the tissue mask."""
    per_tile = tile_um / mask_mpp
    height = max(1, int(round(rows * per_tile)))
    width = max(1, int(round(cols * per_tile)))
    padded = np.zeros((height, width), dtype=np.float32)
    h, w = min(height, mask.shape[0]), min(width, mask.shape[1])
    padded[:h, :w] = mask[:h, :w]
    image = Image.fromarray(padded, mode="F").resize((cols, rows), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def _blocks(
    tissue: npt.NDArray[np.bool_], block_tiles: int
) -> Iterator[tuple[int, int, int, int]]:
    """Bounding boxes (r0, c0, r1, c1) of the tissue inside each block of the tile grid."""
    rows, cols = tissue.shape
    for r in range(0, rows, block_tiles):
        for c in range(0, cols, block_tiles):
            sub = tissue[r : r + block_tiles, c : c + block_tiles]
            if not sub.any():
                continue
            rr = np.flatnonzero(sub.any(axis=1))
            cc = np.flatnonzero(sub.any(axis=0))
            yield r + int(rr[0]), c + int(cc[0]), r + int(rr[-1]) + 1, c + int(cc[-1]) + 1


class TileClassifier:
    """Tumour probabilities and embeddings of tile batches, without Grad-CAM.

    The same preprocessing, network stages, temperature and test-time augmentation as
    ``Classifier.predict_batch``, in inference mode (no gradients are needed for a tile map).

    Preprocessing is vectorised over the batch when the card allows it (tiles already at the
    model's input size, no breast crop, no Wiener filter): one tensor operation per step of the
    classifier's own transform (RGB or BT.601 luma, scale 0..255 to 0..1 and clip, fixed
    per-channel or per-image standardisation), the same float32 arithmetic in the same order,
    so the inputs equal the per-tile MONAI path up to rounding (tested to 1e-6). Otherwise each
    tile goes through ``Classifier.preprocess``. On 50 px tiles the per-tile MONAI path costs
    about as much as the network.
    """

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.positive_index = classifier.labels.index(positive_label(classifier.labels))
        card = classifier.card
        params = card.preprocessing_params
        normalization = params.get("normalization")
        self._size = int(card.input_size)
        self._channels = int(params["channels"])
        self._vectorised = (
            not params.get("breast_crop")
            and not int(params.get("wiener_kernel") or 0)
            and self._channels in (1, 3)
            and int(params.get("pad_to") or 0) <= self._size
        )
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None
        if isinstance(normalization, dict):
            # MONAI's NormalizeIntensity subtracts and divides by float32 values, channel by
            # channel; a channel with std 0 is divided by 1
            std = np.asarray(normalization["std"], dtype=np.float32)
            self._mean = torch.from_numpy(
                np.asarray(normalization["mean"], dtype=np.float32)
            ).view(1, -1, 1, 1)
            self._std = torch.from_numpy(np.where(std == 0.0, 1.0, std)).view(1, -1, 1, 1)

    def preprocess(
        self, tiles: npt.NDArray[np.uint8] | Sequence[npt.NDArray[np.uint8]]
    ) -> torch.Tensor:
        """The network's (N, C, S, S) float32 input of N uint8 RGB tiles."""
        array = tiles if isinstance(tiles, np.ndarray) else None
        if array is None and tiles and all(
            t.shape == tiles[0].shape for t in tiles
        ):
            array = np.stack(list(tiles))
        if (
            not self._vectorised
            or array is None
            or array.dtype != np.uint8
            or array.ndim != 4
            or array.shape[1:] != (self._size, self._size, 3)
        ):
            return torch.stack([self.classifier.preprocess(tile) for tile in tiles])
        if self._channels == 3:
            batch = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()
        else:
            batch = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32) @ _LUMA)[
                :, None
            ]
        # ScaleIntensityRange(0, 255, 0, 1, clip=True): (x - 0) / 255 * 1 + 0, clipped
        batch = (batch / 255.0).clamp_(0.0, 1.0)
        if self._mean is not None and self._std is not None:
            return ((batch - self._mean) / self._std).contiguous()
        # NormalizeIntensity(): each image to zero mean, unit (population) std, std 0 -> 1.
        # Reduced image by image as MONAI does: a batched reduction rounds differently, and on a
        # uniform image the rounding is all there is (MONAI's std of 1e-7 gives -1, not 0)
        flat = batch.flatten(1)
        mean = torch.stack([torch.mean(row) for row in flat]).view(-1, 1, 1, 1)
        std = torch.stack([torch.std(row, unbiased=False) for row in flat])
        std = torch.where(std == 0.0, torch.ones_like(std), std).view(-1, 1, 1, 1)
        return ((batch - mean) / std).contiguous()

    def __call__(
        self, tiles: npt.NDArray[np.uint8] | Sequence[npt.NDArray[np.uint8]]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]]:
        """Class probabilities (N, C) and embeddings (N, D) of uint8 RGB tiles."""
        card = self.classifier.card
        network = self.classifier.network
        inputs = self.preprocess(tiles)
        count = inputs.shape[0]
        views = 2 if card.hflip_tta else 1
        if views == 2:
            inputs = torch.cat([inputs, torch.flip(inputs, dims=[3])])
        # channels-last memory: the CPU convolutions ran about 10% faster on 50 px tiles in it
        # (median of paired runs; probabilities differ by < 1e-6)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            embedding = network.embed(network.forward_features(inputs))
            logits = network.classify(embedding).view(views, count, -1).mean(dim=0)
            probabilities = torch.softmax(logits / card.temperature, dim=1).double().numpy()
            embeddings = embedding.view(views, count, -1).mean(dim=0).float().numpy()
        return probabilities, embeddings


def _block_tiles(
    region: npt.NDArray[np.uint8],
    tissue: npt.NDArray[np.bool_],
    r0: int,
    c0: int,
    side: float,
) -> npt.NDArray[np.uint8]:
    """The tissue tiles of a block (``region`` read from tile (r0, c0)), in row-major order,
    as (K, 50, 50, 3). A level at exactly 4 µm/pixel is cut by one reshape; otherwise each
    tile is cut at its rounded position and resized to 50 x 50 (bilinear)."""
    rows, cols = tissue.shape
    if abs(side - TILE_PIXELS) < 1e-6:
        grid = region[: rows * TILE_PIXELS, : cols * TILE_PIXELS].reshape(
            rows, TILE_PIXELS, cols, TILE_PIXELS, 3
        )
        return np.ascontiguousarray(grid.transpose(0, 2, 1, 3, 4)[tissue])
    x0, y0 = int(round(c0 * side)), int(round(r0 * side))
    size = int(round(side))
    out = np.empty((int(tissue.sum()), TILE_PIXELS, TILE_PIXELS, 3), dtype=np.uint8)
    for n, (r, c) in enumerate(zip(*np.nonzero(tissue), strict=True)):
        tx, ty = int(round((c0 + c) * side)) - x0, int(round((r0 + r) * side)) - y0
        tile = np.ascontiguousarray(region[ty : ty + size, tx : tx + size])
        out[n] = np.asarray(
            Image.fromarray(tile).resize((TILE_PIXELS, TILE_PIXELS), Image.Resampling.BILINEAR)
        )
    return out


class _TileBatches:
    """A fixed (batch_size, 50, 50, 3) buffer of tiles and their grid positions.

    Every batch the network sees has exactly ``batch_size`` tiles: the last one is filled up
    with tiles of the previous batch (or left as it is) and only its first ``count`` results
    are used. The CPU convolutions keep memory per input shape, so batches of varying size
    made the process grow with the slide, and a last batch of another size per slide would
    make a worker grow from slide to slide.
    """

    def __init__(
        self,
        batch_size: int,
        consume: Callable[[npt.NDArray[np.uint8], npt.NDArray[np.intp], int], None],
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.tiles = np.zeros((batch_size, TILE_PIXELS, TILE_PIXELS, 3), dtype=np.uint8)
        self.where = np.zeros((batch_size, 2), dtype=np.intp)
        self.count = 0
        self.consume = consume

    def add(self, tiles: npt.NDArray[np.uint8], where: npt.NDArray[np.intp]) -> None:
        start = 0
        while start < len(tiles):
            take = min(len(tiles) - start, len(self.tiles) - self.count)
            self.tiles[self.count : self.count + take] = tiles[start : start + take]
            self.where[self.count : self.count + take] = where[start : start + take]
            self.count += take
            start += take
            if self.count == len(self.tiles):
                self.flush()

    def flush(self) -> None:
        """Classify what the buffer holds (the whole buffer; the first ``count`` count)."""
        if self.count:
            self.consume(self.tiles, self.where, self.count)
            self.count = 0


def analyse_slide(
    slide: WholeSlide,
    classifier: Classifier,
    aggregator: SlideAggregator | None = None,
    *,
    threshold: float = 0.5,
    min_tissue_fraction: float = 0.3,
    batch_size: int = 64,
    block_tiles: int = 16,
    thumbnail_pixels: int = 1536,
    max_tiles: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SlideAnalysis:
    """Find tissue, classify its tiles in batches and pool them into a slide result.

    ``threshold`` makes a tile tumour-positive (its tumour probability at or above it);
    ``min_tissue_fraction`` of a tile must be tissue for it to be analysed. Raises
    ``SlideError`` when the slide cannot be analysed (too coarse, smaller than one tile, more
    tissue tiles than ``max_tiles``). ``progress(done, total)`` is called after each batch
    with the tiles classified so far and the tissue tiles in all.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    level = slide.level_for_spacing(ANALYSIS_MPP)
    base = slide.base
    extent_um = max(base.width, base.height) * base.mpp
    if extent_um < TILE_UM:
        raise SlideError(
            f"the slide is {base.width * base.mpp / 1000:.3g} x {base.height * base.mpp / 1000:.3g}"
            f" mm, smaller than one {TILE_UM:.0f} µm analysis tile"
        )
    rows, cols, side = _tile_grid(level, TILE_UM)

    mask_image, mask_mpp = slide.downsampled(TISSUE_MPP)
    mask, saturation_threshold = tissue_mask(mask_image)
    tissue = _tissue_fraction(mask, mask_mpp, rows, cols, TILE_UM) >= min_tissue_fraction
    thumbnail_mpp = max(extent_um / thumbnail_pixels, base.mpp)
    if abs(thumbnail_mpp - mask_mpp) / mask_mpp < 0.05:
        thumbnail = mask_image
    else:
        del mask_image
        thumbnail, thumbnail_mpp = slide.downsampled(thumbnail_mpp)
    timings["tissue_seconds"] = time.perf_counter() - started
    if max_tiles is not None and int(tissue.sum()) > max_tiles:
        raise SlideError(f"{int(tissue.sum())} tissue tiles, more than the limit of {max_tiles}")

    tile_classifier = TileClassifier(classifier)
    labels = classifier.labels
    probability_map = np.full((rows, cols), np.nan, dtype=np.float32)
    stream = aggregator.stream() if aggregator is not None else None
    embedding_sum: npt.NDArray[np.float64] | None = None
    read_seconds = 0.0
    model_seconds = 0.0
    total = int(tissue.sum())
    done = 0

    def consume(tiles: npt.NDArray[np.uint8], where: npt.NDArray[np.intp], count: int) -> None:
        nonlocal embedding_sum, model_seconds, done
        t0 = time.perf_counter()
        probabilities, embeddings = tile_classifier(tiles)
        model_seconds += time.perf_counter() - t0
        probabilities, embeddings, where = probabilities[:count], embeddings[:count], where[:count]
        probability_map[where[:, 0], where[:, 1]] = probabilities[
            :, tile_classifier.positive_index
        ]
        if stream is not None:
            stream.update(embeddings)
        batch_sum = embeddings.astype(np.float64).sum(axis=0)
        embedding_sum = batch_sum if embedding_sum is None else embedding_sum + batch_sum
        done += count
        if progress is not None:
            progress(done, total)

    batches = _TileBatches(batch_size, consume)
    for r0, c0, r1, c1 in _blocks(tissue, block_tiles):
        t0 = time.perf_counter()
        x0, y0 = int(round(c0 * side)), int(round(r0 * side))
        x1, y1 = int(round(c1 * side)), int(round(r1 * side))
        region = slide.read(level, x0, y0, x1 - x0, y1 - y0)
        block = tissue[r0:r1, c0:c1]
        tiles = _block_tiles(region, block, r0, c0, side)
        del region
        rr, cc = np.nonzero(block)
        where = np.stack([rr + r0, cc + c0], axis=1).astype(np.intp)
        read_seconds += time.perf_counter() - t0
        batches.add(tiles, where)
    batches.flush()
    timings["read_seconds"] = read_seconds
    timings["model_seconds"] = model_seconds

    analysed = int(np.count_nonzero(~np.isnan(probability_map)))
    tumour = positive_label(labels)
    if analysed == 0:
        # no tissue: a result that says so, never a guess
        slide_probabilities = {label: (1.0 if label != tumour else 0.0) for label in labels}
        if len(labels) > 2:
            slide_probabilities = {label: 1.0 / len(labels) for label in labels}
        aggregator_name = "no tissue found"
        embedding = np.zeros(0, dtype=np.float32)
    elif stream is not None and aggregator is not None:
        values = stream.probabilities(aggregator.temperature)
        slide_probabilities = {label: float(v) for label, v in zip(labels, values, strict=True)}
        aggregator_name = f"{aggregator.name} {aggregator.version} (gated attention pooling)"
        embedding = (np.asarray(embedding_sum) / analysed).astype(np.float32)
    else:
        tile_values = np.sort(probability_map[~np.isnan(probability_map)])[::-1]
        k = max(1, int(math.ceil(TOP_K_FRACTION * len(tile_values))))
        top = float(tile_values[:k].mean())
        rest = (1.0 - top) / max(len(labels) - 1, 1)
        slide_probabilities = {label: (top if label == tumour else rest) for label in labels}
        aggregator_name = RULE_NAME
        embedding = (np.asarray(embedding_sum) / analysed).astype(np.float32)
    return SlideAnalysis(
        labels=labels,
        positive_label=tumour,
        tile_um=TILE_UM,
        analysis_mpp=ANALYSIS_MPP,
        level=level,
        tissue=tissue,
        probability_map=probability_map,
        threshold=threshold,
        slide_probabilities=slide_probabilities,
        aggregator=aggregator_name,
        aggregator_version=aggregator.version if stream is not None and aggregator else None,
        thumbnail=thumbnail,
        thumbnail_mpp=thumbnail_mpp,
        saturation_threshold=saturation_threshold,
        embedding=embedding,
        seconds=time.perf_counter() - started,
        timings=timings,
    )
