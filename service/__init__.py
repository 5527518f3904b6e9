"""Serving: a BentoML gateway over one worker service per served variant.

Modules, one concern each:
- `config`: the YAML configuration (variants, routes, limits), validated into dataclasses;
- `images`: bytes -> uint8 RGB array, with the allowlist and limits that keep bad input a 4xx;
- `routing`: which variant answers a request (explicit, sticky split, random split, shadow), pure;
- `metrics`: the `effnet_*` Prometheus series;
- `workers`: the per-variant BentoML worker services (batching, threads, devices);
- `gateway`: the HTTP endpoints and the gateway service;
- `app`: what `bentoml serve` imports: builds the services from the configuration;
- `cli`: `effnet serve`; `bench`: the serving benchmark.
"""
