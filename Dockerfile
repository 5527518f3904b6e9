# The serving image. CPU by default; for NVIDIA GPUs pass a CUDA base image and the matching torch
# wheel index, e.g.
#   docker build -t effnet-serving .
#   docker build -t effnet-serving:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=<the PyTorch CUDA 12.6 wheel index> .
#   docker run -p 127.0.0.1:3000:3000 -v $HOME/bentoml:/bentoml effnet-serving   # add --gpus all for CUDA
# The checkpoints are not baked in: mount the model store (make checkpoints fills it) at /bentoml.
# Same runtime packages as bentofile.yaml. NOTE: never built here (no Docker engine on these machines).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=""

ENV PYTHONUNBUFFERED=1 BENTOML_HOME=/bentoml BENTOML_DO_NOT_TRACK=true PATH=/opt/venv/bin:$PATH
# CUDA base images come without Python.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi && python3 -m venv /opt/venv

WORKDIR /app
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.14.1 torchvision==0.29.1 \
 && pip install --no-cache-dir bentoml==1.4.30 "pillow>=10" "simplejpeg>=1.8" "prometheus-client>=0.20" "safetensors>=0.4" "pyyaml>=6" numpy \
      "onnx>=1.17" "onnxscript>=0.5" "onnxruntime>=1.20" "openvino>=2025.0" "uvloop>=0.19" "httptools>=0.6"
COPY models/ models/
COPY store/ store/
COPY engines/ engines/
COPY service/ service/

EXPOSE 3000
VOLUME /bentoml
# Inside a container the server must listen on all interfaces; publish the port on 127.0.0.1 (above)
# to keep it on the host only.
CMD ["python", "-m", "bentoml", "serve", "service.app:Gateway", "--host", "0.0.0.0", "--port", "3000"]
