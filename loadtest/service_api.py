"""The parts of the service's HTTP API the load test reads (GET /variants, /routes, /readyz).

One place that turns the service's answers into plain dicts, so the locustfile, the runner and the
report agree on what a variant is: {name, route, model, dataset, num_classes, params, macs, top1,
weight, device}.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

_NAME_KEYS = ("name", "variant", "id")
_TOP1_KEYS = ("top1", "offline_top1", "top_1", "accuracy")


def _items(obj: Any, key: str) -> list[dict]:
    """A list of dicts from `[...]`, `{key: [...]}`, `{key: {name: {...}}}` or `{name: {...}}`."""
    if isinstance(obj, dict) and key in obj:
        obj = obj[key]
    if isinstance(obj, list):
        return [dict(x) for x in obj if isinstance(x, dict)]
    if isinstance(obj, dict):
        return [{"name": k, **v} for k, v in obj.items() if isinstance(v, dict)]
    raise ValueError(f"unexpected {key} answer: {str(obj)[:200]}")


def _first(d: dict, keys, default=None):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def parse_variants(answer: Any) -> dict[str, dict]:
    """GET /variants -> {variant name: normalised description}."""
    out = {}
    for v in _items(answer, "variants"):
        name = _first(v, _NAME_KEYS)
        if not name:
            continue
        manifest = v.get("manifest") if isinstance(v.get("manifest"), dict) else {}
        top1 = _first(v, _TOP1_KEYS)
        if isinstance(v.get("metrics"), dict):
            top1 = top1 if top1 is not None else v["metrics"].get("top1")
        routes = v.get("routes") if isinstance(v.get("routes"), list) else []
        weights = v.get("weights") if isinstance(v.get("weights"), dict) else {}
        # A variant can sit in several routes (a shadow, for one): its home is where it takes traffic.
        home = v.get("route") or next((r for r in routes if weights.get(r)), routes[0] if routes else "")
        out[name] = {
            **v,
            "name": name,
            "route": home,
            "model": _first(v, ("model", "tag", "model_tag"), ""),
            "dataset": _first(v, ("dataset",), manifest.get("dataset")),
            "num_classes": _first(v, ("num_classes", "classes_count"),
                                  len(v["classes"]) if isinstance(v.get("classes"), list) else None),
            "params": _first(v, ("params", "parameters"), 0),
            "macs": _first(v, ("macs",), 0),
            "top1": top1,
            "weight": _first(v, ("weight", "split_weight"), weights.get(home)),
            "device": v.get("device", ""),
        }
    _fill_from_store(out)
    return out


def _fill_from_store(variants: dict[str, dict]) -> None:
    """Dataset and class count from the local store's manifest where the service did not say."""
    for v in variants.values():
        if v["dataset"] and v["num_classes"]:
            continue
        try:
            from store import read_manifest

            man, _ = read_manifest(v["model"])
        except Exception:
            continue
        v["dataset"] = v["dataset"] or man.dataset
        v["num_classes"] = v["num_classes"] or man.num_classes


def parse_routes(answer: Any, variants: dict[str, dict]) -> tuple[dict[str, dict], str]:
    """GET /routes -> ({route: {weights: {variant: w}, shadow, shadow_fraction}}, default route)."""
    default = ""
    if isinstance(answer, dict):
        default = _first(answer, ("default_route", "default"), "") if not isinstance(answer.get("default"), dict) else ""
    routes = {}
    for r in _items(answer, "routes"):
        name = _first(r, ("name", "route"))
        if not name or not isinstance(name, str):
            continue
        weights = _first(r, ("weights", "split", "variants"), {})
        if isinstance(weights, list):  # [{variant, weight}] or [name, ...]
            weights = {(w.get("variant") or w.get("name")) if isinstance(w, dict) else w:
                       (w.get("weight", 1) if isinstance(w, dict) else 1) for w in weights}
        routes[name] = {**r, "name": name, "weights": dict(weights),
                        "shadow": r.get("shadow") if not isinstance(r.get("shadow"), dict) else r["shadow"].get("variant"),
                        "shadow_fraction": _first(r, ("shadow_fraction", "mirror", "fraction"),
                                                  r["shadow"].get("fraction") if isinstance(r.get("shadow"), dict) else None)}
        if r.get("default") is True or r.get("is_default") is True:
            default = name
    if not routes:  # derive from the variants
        for v in variants.values():
            routes.setdefault(v["route"], {"name": v["route"], "weights": {}})["weights"][v["name"]] = v["weight"] or 0
    if not default and routes:
        default = next(iter(routes))
    return routes, default


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_ready(url: str, timeout: float = 120.0, proc=None) -> None:
    """Poll `url`/readyz until 200; raise on timeout or when `proc` (the server) exits first."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s ({last})")


def catalog(url: str) -> tuple[dict[str, dict], dict[str, dict], str]:
    """(variants, routes, default route) of the service at `url`."""
    variants = parse_variants(get_json(url.rstrip("/") + "/variants"))
    routes, default = parse_routes(get_json(url.rstrip("/") + "/routes"), variants)
    return variants, routes, default
