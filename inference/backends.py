"""Faster forward passes for a classifier's convolutional trunk (``forward_features``).

``inference_backend`` (dicom_node.settings) picks one:
- ``eager``: plain PyTorch (the reference);
- ``torchscript``: ``torch.jit.trace`` of the trunk, frozen and ``optimize_for_inference``;
- ``onnx``: the trunk exported to ONNX (in memory, dynamic batch) and run by ONNX Runtime on the
  CPU with as many threads as torch has.

Only the trunk is accelerated: it is nearly all of the compute. The head (``embed`` and
``classify``) and Grad-CAM stay in eager PyTorch on the trunk's output, so the gradients Grad-CAM
needs (of the predicted logit with respect to the last convolutional stage) are computed exactly
as before, and a backend changes only the rounding of the features (checked: probabilities
within 1e-4 of eager, tests/inference/test_backends.py).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import nn

Backend = Literal["eager", "torchscript", "onnx"]
BACKENDS: tuple[str, ...] = get_args(Backend)

FeatureFunction = Callable[[torch.Tensor], torch.Tensor]


class _Trunk(nn.Module):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.forward_features(x)  # type: ignore[operator]


def check_backend(backend: str) -> None:
    """ValueError naming the known backends unless ``backend`` is one of them."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r} (one of {', '.join(BACKENDS)})")


def compile_features(network: nn.Module, backend: str, example: torch.Tensor) -> FeatureFunction:
    """``network.forward_features`` through ``backend``; ``example`` is one input (N, C, H, W)
    of the right channels and size. Raises ValueError for an unknown backend."""
    check_backend(backend)
    trunk = _Trunk(network).eval()
    if backend == "eager":
        return trunk
    if backend == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            # optimize_for_inference is deprecated in favour of torch.compile, which needs a C
            # compiler at run time; it still works and is what is measured
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(trunk, example)
            scripted = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            scripted(example)  # the first calls run the profiling executor's passes
            scripted(example)
        return scripted
    return _onnx_function(trunk, example)


def _onnx_function(trunk: nn.Module, example: torch.Tensor) -> FeatureFunction:
    import onnxruntime

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript-based exporter (dynamo=False) needs no onnxscript; torch warns that
        # it is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(
            trunk, (example,), buffer,  # type: ignore[arg-type]  # a file object works too
            input_names=["x"], output_names=["features"],
            dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}}, dynamo=False,
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        buffer.getvalue(), options, providers=["CPUExecutionProvider"]
    )

    def features(x: torch.Tensor) -> torch.Tensor:
        array = x.detach().contiguous().numpy()
        (out,) = session.run(["features"], {"x": array})
        return torch.from_numpy(out)

    return features
