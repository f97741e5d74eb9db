# KServe's own model server with the project (siamese-kserve): the image of the custom
# ServingRuntime (predictor) and of the explainer (handlers/tools/deploy/modelserver.py).
#   docker build -f scripts/deploy/kserve/modelserver.Dockerfile -t ghcr.io/example/explainable-similarity-kserve:0.1.0 .
# GPU: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 (and a GPU in the pods' resources).
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# torch first, from the CPU index, so that pip never pulls the CUDA build into a CPU image
RUN python -m pip install --index-url "${TORCH_INDEX}" "torch==2.13.0"
WORKDIR /opt/explainable-similarity
COPY pyproject.toml README.md ./
COPY handlers ./handlers
RUN python -m pip install ".[kserve]" && useradd --uid 1000 --create-home model-server
USER 1000
EXPOSE 8080
# KServe passes --model_name, --model_dir=/mnt/models, --http_port and the engine's options
ENTRYPOINT ["siamese-kserve"]
