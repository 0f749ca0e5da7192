"""The ultrasound pipeline: region crop, frame sampling, most suspicious frame.

Per instance:
- decode each analysed frame to display pixels (RGB, YBR_FULL_422, PALETTE COLOR, MONOCHROME2;
  native, RLE or JPEG: ``inference.image_from_dataset``);
- crop to the tissue region of ``SequenceOfUltrasoundRegions`` when there is a usable one
  (``inference.dicom_pixels.ultrasound_region``): the scale bars, text and Doppler strips around
  it never reach the model;
- multi-frame: all frames, or ``us_max_frames`` evenly spaced ones (first and last included);
  the instance's finding is the mean of the frames' class probabilities (the aggregate), and the
  most suspicious frame (highest probability of malignancy) is the one the SC shows and the SR
  references (Referenced Frame Number), its heatmap pasted back into the full frame.
The series finding is the mean over its instances (as before).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from pydicom.dataset import Dataset

from inference.dicom_pixels import frame_indices, number_of_frames, ultrasound_region
from workers.analysis import (
    ImageAnalysis,
    PipelineError,
    Predictor,
    SeriesAnalysis,
    aggregate,
    decode,
    mean_prediction,
    suspicion_key,
)


def analyse_instance(ds: Dataset, classifier: Predictor, max_frames: int) -> ImageAnalysis:
    """One US instance (single- or multi-frame)."""
    frames = number_of_frames(ds)
    indices = frame_indices(frames, max_frames)
    if not indices:
        raise PipelineError(f"instance {ds.SOPInstanceUID} has no pixel data: not an image")
    region = ultrasound_region(ds)
    images = [decode(ds, index) for index in indices]
    if region is not None:
        top, left, bottom, right = region
        inputs = [image[top:bottom, left:right] for image in images]
    else:
        inputs = images
    predictions = classifier.predict_batch(inputs)
    best = max(range(len(indices)), key=lambda i: suspicion_key(predictions[i]))
    heatmap = predictions[best].heatmap
    if region is not None:
        full = np.zeros(images[best].shape[:2], dtype=np.float32)
        full[top:bottom, left:right] = heatmap
        heatmap = full
    best_prediction = replace(predictions[best], heatmap=heatmap)
    finding = mean_prediction(predictions, best_prediction) if len(predictions) > 1 \
        else best_prediction
    details: dict[str, object] = {
        "frames": frames,
        "frames_analysed": [index + 1 for index in indices],
        "region": list(region) if region is not None else None,
    }
    if frames > 1:
        details["frame_probabilities"] = dict(predictions[best].probabilities)
    return ImageAnalysis(
        source=ds,
        image=images[best],
        prediction=finding,
        frame_number=indices[best] + 1 if frames > 1 else None,
        details=details,
    )


def analyse_series(
    datasets: Sequence[Dataset], classifier: Predictor, max_frames: int
) -> SeriesAnalysis:
    analyses = [analyse_instance(ds, classifier, max_frames) for ds in datasets]
    return SeriesAnalysis(
        analyses=analyses, series_prediction=aggregate([a.prediction for a in analyses])
    )
