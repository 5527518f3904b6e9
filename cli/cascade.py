"""`effnet cascade fit ROUTE`: a cascade route's thresholds, chosen on the stages' validation split."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Choose the thresholds of a cascade route (`policy: {cascade: {stages: [...]}}` in the serving
configuration) on the validation split its stages' checkpoints held out in training, and write them to a
small YAML file beside the configuration, which the route names:

  policy: {cascade: {stages: [compact, b0], thresholds_file: cascade-fashion.yaml}}

The stages' calibrated probabilities (the manifest's temperature applied, as the workers answer) on the
same images decide the thresholds for one target:
  --target-drop P   accuracy within P points of the last stage alone, at the least mean cost (MACs)
  --escalate S      at most a share S of the requests goes past the first stage, at the best accuracy
The expected accuracy, mean MACs per image and share answered by each stage are printed and written
with the thresholds. The server reads the file when it starts (and GET /routes shows the thresholds).

Checkpoints trained without a validation split (or on different ones) are fitted on their test split
instead, with a warning: thresholds chosen on the test images make its figures optimistic.
Exit status 0, or 2 with a message (unknown route, a route that is no cascade, a missing checkpoint)."""


def add_commands(sub) -> None:
    p = sub.add_parser("cascade", help="fit a cascade route's thresholds on the validation split",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    fit = actions.add_parser("fit", help="choose and write a cascade route's thresholds", description=DESCRIPTION,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("route", help="a route of the serving configuration whose policy is a cascade")
    target = fit.add_mutually_exclusive_group()
    target.add_argument("--target-drop", type=float, metavar="POINTS",
                        help="accuracy at most this many points below the last stage's (default 0.3)")
    target.add_argument("--escalate", type=float, metavar="SHARE",
                        help="at most this share (0..1) of the requests goes past the first stage")
    fit.add_argument("--config", help="the serving configuration (default: $EFFNET_SERVE_CONFIG, else "
                                      "service/config.yaml)")
    fit.add_argument("--data", help="the stages' data instead of the one their manifests name "
                                    "(fashion-mnist, imagefolder:PATH, fake)")
    fit.add_argument("--out", type=Path, help="where to write the thresholds (default: the route's "
                                              "thresholds_file, else cascade-ROUTE.yaml beside the configuration)")
    fit.set_defaults(func=run_fit)


def read_route(path: Path, route: str):
    """The route's cascade and its stages' model tags. A thresholds file the route names need not exist
    yet (this command writes it): the configuration is checked with placeholder thresholds for it."""
    import yaml

    from service.config import load_config, parse_config

    raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    policy = (((raw or {}).get("routes") or {}).get(route) or {}).get("policy") if isinstance(raw, dict) else None
    cascade = policy.get("cascade") if isinstance(policy, dict) else None
    if isinstance(cascade, dict) and cascade.get("thresholds_file") and isinstance(cascade.get("stages"), list):
        file = Path(cascade["thresholds_file"])
        file = file if file.is_absolute() else path.resolve().parent / file
        if not file.exists():
            stand_in = {k: v for k, v in cascade.items() if k != "thresholds_file"}
            stand_in["thresholds"] = [1.0] * (len(cascade["stages"]) - 1)
            raw["routes"][route]["policy"] = {"cascade": stand_in}
            cfg = parse_config(raw, str(path))
            return cfg, cfg.routes[route].policy, file
    cfg = load_config(path)
    if route not in cfg.routes:
        raise KeyError(f"unknown route {route!r}; routes: {', '.join(cfg.routes)}")
    policy = cfg.routes[route].policy
    if getattr(policy, "name", None) != "cascade":
        raise ValueError(f"route {route!r} has no cascade policy; give it one, e.g. "
                         "policy: {cascade: {stages: [compact, b0], thresholds_file: cascade-" + route + ".yaml}}")
    return cfg, policy, Path(policy.thresholds_file) if policy.thresholds_file else None


def stage_scores(tag: str, data: str | None, split: str):
    """(calibrated probabilities, labels, manifest) of a stored checkpoint on its `split` ("val" or "test")."""
    import torch
    from torch.utils.data import DataLoader

    from store import InputNormalizer, load_checkpoint
    from training import resolve_config
    from training.data import load_data
    from training.temperature import collect_logits

    model, man = load_checkpoint(tag)
    cfg = resolve_config(split_settings(man, data))
    spec = load_data(cfg)
    images = spec.val if split == "val" else spec.test
    if images is None:
        raise ValueError(f"{tag}: its data has no validation split")
    logits, labels = collect_logits(model, DataLoader(images, batch_size=256), InputNormalizer(man), "cpu")
    probs = torch.softmax(logits.double() / man.temperature, dim=1).numpy()
    return probs, labels.numpy(), man


def split_settings(man, data: str | None) -> dict:
    """The data settings that decide a checkpoint's validation images, as its training recorded them."""
    t = man.training or {}
    keep = {k: t[k] for k in ("val_size", "val_seed", "limit_test", "seed") if k in t}
    return {**keep, "data": data or t.get("data", "fashion-mnist"), "resolution": man.resolution,
            "variant": man.variant}


# What chooses a checkpoint's validation images (training/data.py): its data, the split's size and seed, and
# the test limit (whose subset of an image folder is drawn with the training seed). Not its variant or
# resolution: the stages of a cascade differ in those and still held out the same images.
IMAGE_SETTINGS = ("data", "val_size", "val_seed", "limit_test")


def _images_chosen_by(settings: dict) -> tuple:
    keys = IMAGE_SETTINGS + (("seed",) if settings.get("limit_test") else ())
    return tuple((k, settings.get(k)) for k in keys)


def choose_split(manifests: list, data: str | None) -> str:
    """"val" when every stage held out the same validation images, else "test" (with a warning)."""
    held = [m.metrics.get("val_images") for m in manifests]
    same = len({_images_chosen_by(split_settings(m, data)) for m in manifests}) == 1
    if all(held) and same:
        return "val"
    why = ("some stages were trained without a validation split" if not all(held)
           else "the stages held out different validation images")
    print(f"warning: {why}: fitting on the test split, whose figures are then optimistic; retrain the stages "
          "with one --val-seed and --val-size for honest thresholds", file=sys.stderr)
    return "test"


def run_fit(args) -> int:
    import numpy as np
    import yaml

    from service.config import config_path
    from store import read_manifest
    from training.cascade_fit import fit

    path = config_path(args.config)
    cfg, policy, named = read_route(path, args.route)
    tags = [cfg.variants[s].model for s in policy.stages]
    split = choose_split([read_manifest(t)[0] for t in tags], args.data)
    scored = [stage_scores(t, args.data, split) for t in tags]
    labels = scored[0][1]
    if any(len(s[1]) != len(labels) or not np.array_equal(s[1], labels) for s in scored):
        raise ValueError("the stages' images differ (their labels do not line up); give them one --data")
    drop = args.target_drop if args.target_drop is not None else None if args.escalate is not None else 0.3
    result = fit([s[0] for s in scored], labels, [float(s[2].macs) for s in scored], drop=drop,
                 escalate=args.escalate, average_last=policy.average_last)
    out = args.out or named or path.resolve().parent / f"cascade-{args.route}.yaml"
    record = {"route": args.route, "stages": list(policy.stages), "thresholds": list(result.chosen.thresholds),
              "target": result.target, "split": split, "images": int(len(labels)),
              "average_last": policy.average_last, "expected": result.chosen.as_dict(),
              "last_stage_alone": result.last.as_dict()}
    Path(out).write_text("# thresholds of a cascade route, written by `effnet cascade fit`\n"
                         + yaml.safe_dump(record, sort_keys=False))
    c, last = result.chosen, result.last
    print(f"route {args.route}: stages {' -> '.join(policy.stages)}, thresholds "
          f"{', '.join(f'{t:.4f}' for t in c.thresholds)} ({split} split, {len(labels)} images)")
    print(f"  cascade:    top-1 {100 * c.accuracy:.2f}%, {c.mean_cost / 1e6:.1f} M MACs per image, answered by "
          + ", ".join(f"{s} {100 * a:.1f}%" for s, a in zip(policy.stages, c.answered)))
    print(f"  last alone: top-1 {100 * last.accuracy:.2f}%, {last.mean_cost / 1e6:.1f} M MACs per image")
    print(f"wrote {out}")
    if named is None and args.out is None:
        print(f"name it in the route: policy: {{cascade: {{stages: [{', '.join(policy.stages)}], "
              f"thresholds_file: {Path(out).name}}}}}")
    return 0
