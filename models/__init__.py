"""The model zoo: every EfficientNet-B0 variant of the seed slides, reachable by name.

>>> from models import create_model, list_models
>>> net = create_model("compact", num_classes=10)
"""
from . import compact, efficientnet, mec  # noqa: F401  (registers the families)
from .complexity import count_macs, count_params
from .network import EfficientNetVariant, NetConfig, Row
from .registry import VariantInfo, build_from_config, create_model, get_variant, list_aliases, list_models, model_config

__all__ = [
    "EfficientNetVariant", "NetConfig", "Row", "VariantInfo", "build_from_config", "count_macs",
    "count_params", "create_model", "get_variant", "list_aliases", "list_models", "model_config",
]
