"""Silences diffusers' "Flax classes are deprecated" warning, logged on every Flax module setup.

diffusers 0.39 is pinned on purpose (the last release with Flax models), so the warning says nothing
new and would flood the training log. Only that message is dropped; every other warning stays.
"""
from __future__ import annotations

import logging

_MESSAGE = "Flax classes are deprecated"


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _MESSAGE not in str(record.msg)


def _add(target) -> None:
    if not any(isinstance(f, _DropFlaxDeprecation) for f in target.filters):
        target.addFilter(_DropFlaxDeprecation())


def silence_flax_deprecation() -> None:
    """Filters the loggers of diffusers' Flax modules (records are dropped where they are made, before
    any handler, pytest's included) and the library handler (for modules imported later)."""
    from diffusers.utils import logging as diffusers_logging

    for handler in diffusers_logging._get_library_root_logger().handlers:
        _add(handler)
    from diffusers import FlaxAutoencoderKL, FlaxControlNetModel, FlaxDDIMScheduler, FlaxDDPMScheduler, FlaxUNet2DConditionModel  # noqa: F401
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("diffusers") and isinstance(logger, logging.Logger):
            _add(logger)
