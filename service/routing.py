"""Which variant answers a request: pure functions over the configuration, no server needed.

1. An explicit `variant` wins; it must belong to the route when one is given.
2. Otherwise the route's split decides: with a client id, by a stable hash of it (the same client
   lands on the same variant while the weights stay the same, and a weight change moves only the
   clients it must); without one, at random by weight.
3. No route given: the variant's route (explicit variant), else the default route.
4. A variant that is down (the caller passes the set: service/health.py) keeps its share: the route's
   `fallback` answers that share while it is down (assignment "fallback"), and since the pick itself
   never changes, a sticky client returns to its own variant once it is back. Without a fallback, or
   with the fallback down too, the pick stands and its variant answers 503. An explicit variant is
   never replaced: a client that names a variant wants that model's answer.
Shadowing picks, independently of the primary choice, whether a request is mirrored (never to a down one).
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

from .config import RouteConfig, ServingConfig


def shown(value: object, limit: int = 64) -> str:
    """A client's value quoted in an error message, cut to `limit` characters: a 10 kB variant name
    should not come back as a 10 kB error. Non-ASCII characters are escaped: Starlette decodes a form
    field that is not valid UTF-8 as Latin-1, so the byte 0xff would otherwise come back as 'ÿ', while
    '\\xff' names the byte the client sent."""
    text = ascii(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(str(value)):,} characters)"


class RoutingError(ValueError):
    """A request names an unknown route or variant, or a variant outside its route (answered 400)."""


@dataclass(frozen=True)
class Assignment:
    route: str
    variant: str
    how: str  # "explicit", "split", "default" (the route has one variant), "fallback" (instead of a down one) or "budget"
    shadow: str | None = None  # the variant to mirror this request to, if any
    instead_of: str | None = None  # with "fallback": the variant that was picked and is down
    budget: Any = None  # with "budget": service.budget.Choice, what the latency-budget policy chose and why


def sticky_pick(route: str, client_id: str, split: dict[str, float]) -> str:
    """The variant a client id gets in a route: weighted rendezvous hashing, P(variant) = its weight.

    Every variant draws a stable score from (route, client id, variant), scaled by its weight, and the
    highest wins. Cumulative-weight intervals (pick_by_weight on one hash) would move clients between
    variants whose weights did not change (50/25/25 -> 60/20/20 sends 5% from compact to mec); here a
    weight change moves only the clients that must move (PATCH /routes/NAME; tests/service/test_routing.py).
    """
    best, best_score = None, -1.0
    for variant, weight in split.items():
        if weight <= 0:
            continue
        digest = hashlib.sha256(f"{route}\0{client_id}\0{variant}".encode("utf-8", "surrogatepass")).digest()
        h = ((int.from_bytes(digest[:8], "big") >> 11) + 0.5) / 2**53  # 53 bits: exactly in (0, 1), log(h) < 0
        score = weight / -math.log(h)  # the minimum of exponential clocks with rates = weights
        if score > best_score:
            best, best_score = variant, score
    return best


def pick_by_weight(split: dict[str, float], u: float) -> str:
    """The variant whose cumulative-weight interval holds u in [0, 1); order is the config's."""
    acc = 0.0
    last = None
    for variant, weight in split.items():
        if weight <= 0:
            continue
        acc += weight
        last = variant
        if u < acc:
            return variant
    return last  # rounding: u just under 1 with weights summing to 0.999...


class Router:
    def __init__(self, cfg: ServingConfig, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.rng = rng or random.Random()

    def _route(self, name: str) -> RouteConfig:
        try:
            return self.cfg.routes[name]
        except KeyError:
            raise RoutingError(f"unknown route {shown(name)}; routes: {', '.join(self.cfg.routes)}") from None

    def assign(self, route: str | None = None, variant: str | None = None, client_id: str | None = None,
               down: frozenset[str] = frozenset()) -> Assignment:
        if variant is not None:
            if variant not in self.cfg.variants:
                raise RoutingError(f"unknown variant {shown(variant)}; variants: {', '.join(self.cfg.variants)}")
            if route is not None:
                r = self._route(route)
                if variant not in r.variants:
                    raise RoutingError(
                        f"variant {variant!r} is not in route {shown(route)}; its variants: {', '.join(r.variants)}"
                    )
            else:
                r = self._route(self.cfg.route_of(variant))
            return Assignment(r.name, variant, "explicit", self._shadow(r, variant, down))
        r = self._route(route if route is not None else self.cfg.default_route)
        live = {v: w for v, w in r.split.items() if w > 0}
        if len(live) == 1:
            chosen, how = next(iter(live)), "default"
        else:
            chosen = sticky_pick(r.name, client_id, live) if client_id else pick_by_weight(live, self.rng.random())
            how = "split"
        if chosen in down and r.fallback is not None and r.fallback not in down:
            return Assignment(r.name, r.fallback, "fallback", self._shadow(r, r.fallback, down), instead_of=chosen)
        return Assignment(r.name, chosen, how, self._shadow(r, chosen, down))

    def _shadow(self, r: RouteConfig, primary: str, down: frozenset[str] = frozenset()) -> str | None:
        sh = r.shadow
        if sh is None or sh.variant == primary or sh.fraction <= 0 or sh.variant in down:
            return None
        return sh.variant if self.rng.random() < sh.fraction else None
