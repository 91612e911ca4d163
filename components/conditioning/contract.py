"""What a conditioning type is: the contract every control-image maker follows.

A conditioner is a class built once per worker thread from the pipeline's ConditioningConfig, called on
one RGB image (H×W×3 uint8 numpy array), returning the control image (same size: ControlNet pairs pixels;
H×W×3 uint8, or H×W uint8 for a gray map such as edges or depth, stored as a 1-channel PNG and read back
as RGB) or raising NoControl(reason) when the image has nothing to condition on (no person for pose): the
row is then rejected from that type's dataset with the reason, never dropped. Workers are threads (OpenCV,
MediaPipe and torch release the GIL while they compute); a class whose library already uses every core
per call sets `max_parallel = 1`.
Register a new type in components/registry.py CONDITIONERS with the image family whose environment
has its libraries: the pipeline runs each family's types in a task on that family's image and lists
every type's dataset at the end (conditioning_merge). Options go in ConditioningConfig; model weights
load from safetensors (use_safetensors=True).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class NoControl(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Conditioner(Protocol):
    name: str

    def __init__(self, config) -> None: ...

    def __call__(self, rgb: np.ndarray) -> np.ndarray: ...
