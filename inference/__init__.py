"""breastcad inference: images in, predictions out.

Public API: ``load_bundled(modality)`` -> ``Classifier`` whose ``predict(image)`` returns a
``Prediction``; ``bundled_cards()``; ``ModelCard``; ``ModelNotAvailableError``;
``image_from_dataset(ds, frame)``, ``number_of_frames(ds)`` and ``image_from_file(path)`` for
uint8 RGB display pixels.
"""

from inference.bundled import ModelNotAvailableError, bundled_cards, load_bundled
from inference.card import ModelCard
from inference.classifier import Classifier
from inference.dicom_pixels import image_from_dataset, image_from_file, number_of_frames
from inference.prediction import Prediction

__all__ = [
    "Classifier",
    "ModelCard",
    "ModelNotAvailableError",
    "Prediction",
    "bundled_cards",
    "image_from_dataset",
    "image_from_file",
    "load_bundled",
    "number_of_frames",
]
