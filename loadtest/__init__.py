"""Load tests: Locust sends real labelled images through the service while a real Prometheus
server scrapes it; the report puts accuracy under load beside latency and throughput per variant.

- `images`: the labelled image sets (Fashion-MNIST test PNGs, scikit-image photos) and broken uploads;
- `locustfile`: the users (explicit per-variant and split traffic), every answer checked;
- `prometheus`: a private Prometheus server and PromQL over its HTTP API;
- `promql`: the per-step queries (latency quantiles, throughput, batch size, errors);
- `processes`, `service_api`: the service under test, started and stopped, and its catalog;
- `offline`: the same images classified outside the service (the reference for accuracy);
- `run`: the step-load run that ties them together; `report`: report.md, tradeoff.png, results.json.

The commands are `effnet loadtest` and `effnet report` (cli/loadtest.py).
"""
