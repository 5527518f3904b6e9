# The serving image. CPU by default; for NVIDIA GPUs pass a CUDA base image and the matching torch
# wheel index, e.g.
#   docker build -t effnet-serving .
#   docker build -t effnet-serving:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=<the PyTorch CUDA 12.6 wheel index> .
#   docker run -p 127.0.0.1:3000:3000 -v $HOME/bentoml:/bentoml effnet-serving   # add --gpus all for CUDA
# The checkpoints are not baked in: mount the model store (make checkpoints fills it) at /bentoml.
# For an image that carries them, and their engines prepared ahead, so that it needs no store, build the
# bento with them and let BentoML make the image (docs/operations.md, "Building an image"):
#   effnet build --pack-models [--config PATH]
#   bentoml containerize effnet-serving:latest -t effnet-serving:packed
# The packages are the runtime set, requirements.txt, which pyproject.toml and bentofile.yaml read too.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 BENTOML_HOME=/bentoml BENTOML_DO_NOT_TRACK=true PATH=/opt/venv/bin:$PATH
# CUDA base images come without Python.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt .
# torch and torchvision first, from TORCH_INDEX_URL when given (the CUDA wheels); the rest from PyPI.
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
      $(grep -E '^(torch|torchvision)==' requirements.txt) \
 && pip install --no-cache-dir -r requirements.txt
COPY models/ models/
COPY store/ store/
COPY engines/ engines/
COPY service/ service/
COPY cli/ cli/
# `effnet` for the commands the image serves with (`effnet serve`, `effnet worker` in the Kubernetes worker pods)
RUN printf '#!/bin/sh\nexec python -m cli "$@"\n' > /opt/venv/bin/effnet && chmod +x /opt/venv/bin/effnet

EXPOSE 3000
VOLUME /bentoml
# Inside a container the server must listen on all interfaces; publish the port on 127.0.0.1 (above)
# to keep it on the host only. cli.bentoml_serve is `bentoml serve` with a prompt restart of a crashed
# worker (inside containers too) and its sockets kept while it drains on SIGTERM.
CMD ["python", "-m", "cli.bentoml_serve", "serve", "service.app:Gateway", "--host", "0.0.0.0", "--port", "3000"]
