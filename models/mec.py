"""The Mobile Equal channel Convolution (MEC) network and its three expansion ablations.

NOTE: the slides do not give enough to reproduce their MEC tables; this is the reading we chose.
- The MEC block is built exactly as the slides draw it (`blocks.MEC`): three 1x1 convs and two kxk
  depthwise convs, all at one width, SE after the second depthwise conv.
- The seed rows grow *exactly linearly* in e (+0.19M per unit in the stride-2 table, +0.27M in the
  size-change table, +0.43M in the output-based one). An equal-channel block whose width is e x in
  has a width^2 term, so the e-blocks cannot be MEC blocks. We read them as the *transition* blocks
  (the ones without a skip: stride 2, or a change of width), built as inverted bottlenecks
  (MBConv + SE) whose expanded width is e x in (or e x out for the third table): linear in e.
- Every block with a skip (9 of 16) is an MEC block. Its equal width is 2.75 x its channels: the
  width at which an MEC block costs about what B0's MBConv6+SE costs (C^2 + 2.5 C in ~= 15 in^2
  gives C ~= 2.8 in). Widths 2.5x / 3x put the worst row 12% / 13% off; 2.75x gives at most 6.7%
  (rms 3.1%) over all 17 rows; `effnet models` prints each row's difference.
- The stage-2 block (32 -> 16, unexpanded MBConv1) stays B0's in every ablation; in the stride-2
  table the two stride-1 width changes (80 -> 112, 192 -> 320) keep B0's MBConv6.
"""
from __future__ import annotations

from .efficientnet import B0, B0_ROWS
from .network import Row
from .registry import VariantInfo, register

MEC_WIDTH = 2.75  # equal-channel width of the MEC (skip) blocks, x their channels; see NOTE above

ABLATIONS = {
    # name: (which transition blocks take e, width base, the slides' e values and #Params)
    "stride2": ("stride2", "in", (1, 2, 3, 4, 5, 6), (4.62e6, 4.81e6, 5.00e6, 5.19e6, 5.37e6, 5.56e6)),
    "resize": ("resize", "in", (1, 2, 3, 4, 5), (4.08e6, 4.35e6, 4.62e6, 4.89e6, 5.16e6)),
    "out": ("resize", "out", (1, 1.5, 2, 2.5, 3, 3.5), (4.24e6, 4.46e6, 4.67e6, 4.89e6, 5.10e6, 5.31e6)),
}
_DESCRIBE = {
    "stride2": "e x in expansion in the stride-2 blocks",
    "resize": "e x in expansion in every block that changes size",
    "out": "e x out expansion in every block that changes size",
}


def mec_rows(which: str, base: str, e: float) -> tuple[Row, ...]:
    rows = [B0_ROWS[0]]
    for r in B0_ROWS[1:]:
        takes_e = r.stride == 2 if which == "stride2" else (r.stride == 2 or r.in_ch != r.out_ch)
        if takes_e:
            width = int(round(e * (r.in_ch if base == "in" else r.out_ch)))
            rows.append(Row("mbconv", r.kernel, r.stride, r.in_ch, r.out_ch, 1, width=width))
        else:
            rows.append(Row("mbconv", r.kernel, r.stride, r.in_ch, r.out_ch, 1, expand=r.expand))
        if r.layers > 1:
            rows.append(Row("mec", r.kernel, 1, r.out_ch, r.out_ch, r.layers - 1, expand=MEC_WIDTH))
    return tuple(rows)


for _abl, (_which, _base, _es, _seeds) in ABLATIONS.items():
    for _e, _seed in zip(_es, _seeds):
        _name = f"mec-{_abl}-e{_e:g}"
        register(
            VariantInfo(
                _name, "mec", B0.with_overrides(rows=mec_rows(_which, _base, _e)),
                f"MEC network, {_DESCRIBE[_abl]}, e={_e:g}", seed_params=_seed,
            ),
            # The slides' headline network: e=3 on output channels, fewer parameters than B0.
            aliases=("mec",) if _name == "mec-out-e3" else (),
        )
