"""The model zoo: every variant exists, runs, and meets the slides' figures."""
import json

import pytest
import torch

from models import count_macs, count_params, create_model, get_variant, list_models, model_config
from models.network import NetConfig, Row

REQUIRED = [
    "b0",
    "b0-seend-noskip", "b0-seend-hasskip", "b0-seend-all", "b0-nose-noskip", "b0-nose-hasskip", "b0-nose-all",
    "lite0", "lite0-s2-dwconv3x3", "lite0-s2-conv3x3", "lite0-s2-conv1x1", "lite0-s2-remove",
    "lite0-s2-remove-s3-conv131", "compact",
    *[f"mec-stride2-e{e}" for e in range(1, 7)],
    *[f"mec-resize-e{e}" for e in range(1, 6)],
    "mec-out-e1", "mec-out-e1.5", "mec-out-e2", "mec-out-e2.5", "mec-out-e3", "mec-out-e3.5",
    "mec",
]

_PARAMS: dict[str, int] = {}


def params_of(name: str) -> int:
    if name not in _PARAMS:
        _PARAMS[name] = count_params(create_model(name))
    return _PARAMS[name]


@pytest.mark.parametrize("name", REQUIRED)
def test_required_names_exist(name):
    assert get_variant(name).config is not None


def test_mec_alias_is_out_e3_and_smaller_than_b0():
    assert get_variant("mec").name == "mec-out-e3"
    assert params_of("mec-out-e3") < params_of("b0")


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(KeyError, match="b0-nose-all"):
        create_model("b1")


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("resolution", [32, 224])
def test_forward_backward_finite(name, resolution):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, drop_path_rate=0.1)
    x = torch.randn(2, 3, resolution, resolution)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).mean().backward()
    assert torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x[:1])).all()


def test_single_channel_input_and_overrides():
    model = create_model("compact", num_classes=3, in_chans=1, drop_rate=0.0)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert model.cfg.drop_rate == 0.0


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_meets_the_slides(name):
    info = get_variant(name)
    params = params_of(name)
    rel = abs(params + info.seed_offset - info.seed_params) / info.seed_params
    tolerance = {"b0-se": 0.005, "compact": 0.005, "mec": 0.10}[info.family]
    assert rel <= tolerance, f"{name}: {params:,} (+{info.seed_offset:,.0f}) vs {info.seed_params:,.0f}: {rel:.2%}"


def test_lite0_is_exactly_efficientnet_lite0():
    assert params_of("lite0") == 4_652_008


def test_compact_family_mac_differences_match_the_slides():
    names = list_models("compact")
    macs = {n: count_macs(create_model(n), 224) for n in names}
    for n in names:
        ours = macs[n] - macs["lite0"]
        seed = get_variant(n).seed_macs - get_variant("lite0").seed_macs
        assert abs(ours - seed) <= 0.5e6, f"{n}: {ours / 1e6:+.2f}M vs slides {seed / 1e6:+.2f}M"
    # The slides' ordering of stage-3 blocks: Conv31 < Conv131 < MBConv6 (Remove).
    assert macs["compact"] < macs["lite0-s2-remove-s3-conv131"] < macs["lite0-s2-remove"]


@pytest.mark.parametrize("ablation", ["mec-stride2-", "mec-resize-", "mec-out-"])
def test_mec_parameters_increase_with_e(ablation):
    names = [n for n in list_models("mec") if n.startswith(ablation)]
    es = [float(n.rsplit("-e", 1)[1]) for n in names]
    assert es == sorted(es) and len(es) >= 5
    counts = [params_of(n) for n in names]
    assert all(a < b for a, b in zip(counts, counts[1:])), counts


def test_mec_block_is_equal_channel_with_se_after_second_depthwise():
    from models.blocks import MEC

    model = create_model("mec")
    blocks = [m for m in model.modules() if isinstance(m, MEC)]
    assert blocks, "the MEC network has MEC blocks"
    for b in blocks:
        convs = [b.conv_pw.conv, b.conv_dw.conv, b.conv_mid.conv, b.conv_dw2.conv]
        widths = {c.out_channels for c in convs} | {b.conv_pwl.conv.in_channels}
        assert len(widths) == 1  # every conv inside works at one width
        assert [c.kernel_size[0] == 1 for c in convs] == [True, False, True, False]
        assert b.conv_dw.conv.groups == b.conv_dw.conv.in_channels  # depthwise
        names = [n for n, _ in b.named_children()]
        assert names.index("se") == names.index("conv_dw2") + 1


def test_se_placement_is_data():
    cfg = model_config("b0-seend-hasskip")
    placed = {(layer.has_skip, layer.se) for layer in cfg.layers()}
    assert placed == {(True, "end"), (False, "dw")}
    assert {layer.se for layer in model_config("b0-nose-all").layers()} == {None}


def test_config_round_trips_through_a_dict():
    cfg = model_config("compact")
    again = NetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(block="nope", kernel=3, stride=1, in_ch=8, out_ch=8), "unknown block"),
        (dict(block="mbconv", kernel=4, stride=1, in_ch=8, out_ch=8), "kernel"),
        (dict(block="mbconv", kernel=3, stride=3, in_ch=8, out_ch=8), "stride"),
        (dict(block="conv31", kernel=3, stride=1, in_ch=8, out_ch=8), "cannot carry SE"),
    ],
)
def test_rows_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        Row(**bad)


def test_mismatched_rows_fail_loudly():
    with pytest.raises(ValueError, match="channels"):
        NetConfig(rows=(Row("mbconv", 3, 1, 32, 16), Row("mbconv", 3, 1, 24, 24)))


def test_stochastic_depth_matches_torchvisions():
    """Our StochasticDepth replaces torchvision.ops' (an import of torch._dynamo in every worker):
    same output and same random draws in training, the identity in eval."""
    from torchvision.ops import StochasticDepth as Reference

    from models.blocks import StochasticDepth

    x = torch.randn(64, 8, 4, 4)
    for p in (0.0, 0.2, 1.0):
        ours, ref = StochasticDepth(p), Reference(p, "row")
        torch.manual_seed(3)
        a = ours(x)
        torch.manual_seed(3)
        b = ref(x)
        assert torch.equal(a, b)
        assert torch.equal(ours.eval()(x), x)
    assert 0 < (StochasticDepth(0.5)(x).flatten(1).abs().sum(1) == 0).sum() < 64  # rows dropped, not all
    with pytest.raises(ValueError, match="between 0 and 1"):
        StochasticDepth(1.5)
