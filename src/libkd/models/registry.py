"""Helpers for the model entry points libkd registers in timm's registry."""

from __future__ import annotations

from typing import Any

# timm's create_model passes these to every entry point; our constructors do not take them.
TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the arguments only timm's own builder understands."""
    return {k: v for k, v in kwargs.items() if k not in TIMM_ONLY_KWARGS}
