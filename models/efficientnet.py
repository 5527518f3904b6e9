"""EfficientNet-B0 and the SE-placement paper's variants (SEend / noSE at noskip / hasskip / all).

The SE variants differ from B0 by data only: the network's `se_noskip` / `se_hasskip` policy.
"""
from __future__ import annotations

from .network import NetConfig, Row
from .registry import VariantInfo, register

# The slides' EfficientNet-B0 table, stages 2-8 (stage 1 is the stem, 9-10 the head).
B0_ROWS: tuple[Row, ...] = (
    Row("mbconv", kernel=3, stride=1, in_ch=32, out_ch=16, layers=1, expand=1),
    Row("mbconv", kernel=3, stride=2, in_ch=16, out_ch=24, layers=2, expand=6),
    Row("mbconv", kernel=5, stride=2, in_ch=24, out_ch=40, layers=2, expand=6),
    Row("mbconv", kernel=3, stride=2, in_ch=40, out_ch=80, layers=3, expand=6),
    Row("mbconv", kernel=5, stride=1, in_ch=80, out_ch=112, layers=3, expand=6),
    Row("mbconv", kernel=5, stride=2, in_ch=112, out_ch=192, layers=4, expand=6),
    Row("mbconv", kernel=3, stride=1, in_ch=192, out_ch=320, layers=1, expand=6),
)

B0 = NetConfig(rows=B0_ROWS)

register(
    VariantInfo(
        "b0", "b0-se", B0, "EfficientNet-B0 (MBConv with SE after the depthwise conv)",
        seed_params=5.29e6, pretrained="torchvision efficientnet_b0 state_dict (bring your own)",
    ),
    aliases=("efficientnet-b0",),
)

# NOTE: "noskip"/"hasskip" read as: a block has a skip when stride == 1 and in == out channels
# (9 of B0's 16 blocks). "SEend" gates the block's *output* channels with a squeeze width of
# in_ch // 4, as B0. This reading reproduces every row of the SE table to within 0.07%
# (e.g. SEend@all 4,778,004 vs 4.78M); squeezing from the output or expanded width, or calling every
# stride-1 block "skip", misses by 0.6-13%.
_SE_SEEDS = {
    ("seend", "noskip"): 5.16e6,
    ("seend", "hasskip"): 4.91e6,
    ("seend", "all"): 4.78e6,
    ("nose", "noskip"): 5.11e6,
    ("nose", "hasskip"): 4.83e6,
    ("nose", "all"): 4.65e6,
}
for (change, where), seed in _SE_SEEDS.items():
    place = "end" if change == "seend" else None
    noskip = place if where in ("noskip", "all") else "dw"
    hasskip = place if where in ("hasskip", "all") else "dw"
    what = "SE moved after the last 1x1 conv" if change == "seend" else "SE removed"
    register(
        VariantInfo(
            f"b0-{change}-{where}", "b0-se",
            B0.with_overrides(se_noskip=noskip, se_hasskip=hasskip),
            f"B0 with {what} in {where} blocks", seed_params=seed,
        )
    )
