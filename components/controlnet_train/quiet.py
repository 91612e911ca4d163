"""Silences two warnings a user can do nothing about: diffusers' "Flax classes are deprecated", logged on every
Flax module setup (diffusers 0.39 is pinned on purpose, the last release with Flax models), and orbax's notice that
it re-registers its own array handler. Only those messages are dropped; every other warning stays.
"""
from __future__ import annotations

import logging

_MESSAGE = "Flax classes are deprecated"


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _MESSAGE not in str(record.msg)


class _DropOrbaxReregistration(logging.Filter):
    """orbax logs through absl, at import, that it registers its own jax.Array handler over its own: nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Type handler registry type" not in str(record.msg)


def silence_orbax_reregistration() -> None:
    _add_filter(logging.getLogger("absl"), _DropOrbaxReregistration)


def _add_filter(target, cls) -> None:
    if not any(isinstance(f, cls) for f in target.filters):
        target.addFilter(cls())


def silence_flax_deprecation() -> None:
    """Filters the loggers of diffusers' Flax modules (records are dropped where they are made, before
    any handler, pytest's included) and the library handler (for modules imported later)."""
    from diffusers.utils import logging as diffusers_logging

    for handler in diffusers_logging._get_library_root_logger().handlers:
        _add_filter(handler, _DropFlaxDeprecation)
    from diffusers import FlaxAutoencoderKL, FlaxControlNetModel, FlaxDDIMScheduler, FlaxDDPMScheduler, FlaxUNet2DConditionModel  # noqa: F401
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("diffusers") and isinstance(logger, logging.Logger):
            _add_filter(logger, _DropFlaxDeprecation)
