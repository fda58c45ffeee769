# syntax=docker/dockerfile:1.7
#
# fluxo container image: one static-ish binary on distroless/cc, non-root, no shell.
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t <registry>/fluxo:<tag> --push .
#
# The build stage always runs on the builder's own platform ($BUILDPLATFORM) and
# cross-compiles for $TARGETARCH, so an arm64 image is built at native speed on an
# amd64 builder (no QEMU emulation of rustc). The runtime stage is the per-arch
# distroless image.
#
# Base images are referenced by tag; pin them by digest in your registry mirror
# (e.g. with Renovate) for reproducible builds. The build stage (Debian 12
# "bookworm") and the runtime (distroless cc-debian12) share the same glibc.

ARG RUST_VERSION=1.95

FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
ARG BUILDARCH
WORKDIR /src

# C toolchain for the target: `ring` (rustls) and the bundled SQLite are C code.
# Only needed when cross-compiling; the rust image already has the native gcc.
RUN set -eux; \
    case "${TARGETARCH}" in \
      amd64) triple=x86_64-unknown-linux-gnu;  gnu=x86-64-linux-gnu; cc=x86_64-linux-gnu-gcc ;; \
      arm64) triple=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu; cc=aarch64-linux-gnu-gcc ;; \
      *) echo "unsupported TARGETARCH=${TARGETARCH}" >&2; exit 1 ;; \
    esac; \
    if [ "${TARGETARCH}" != "${BUILDARCH}" ]; then \
      apt-get update; \
      apt-get install -y --no-install-recommends "gcc-${gnu}" "libc6-dev-${TARGETARCH}-cross"; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    rustup target add "${triple}"; \
    { echo "triple=${triple}"; echo "cc=${cc}"; } > /etc/fluxo-target

COPY . .

# --locked: the image is built from exactly the dependencies in Cargo.lock.
# Cache mounts keep the registry and the target dir between builds (per arch).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,id=fluxo-target-${TARGETARCH},sharing=locked \
    set -eux; \
    . /etc/fluxo-target; \
    upper="$(echo "${triple}" | tr 'a-z-' 'A-Z_')"; \
    export "CARGO_TARGET_${upper}_LINKER=${cc}"; \
    export "CC_$(echo "${triple}" | tr '-' '_')=${cc}"; \
    cargo build --release --locked --bin fluxo --target "${triple}"; \
    mkdir -p /out; \
    cp "target/${triple}/release/fluxo" /out/fluxo

# Runtime: glibc + libgcc + CA certificates, no shell, no package manager,
# user 65532 ("nonroot"). Works with readOnlyRootFilesystem: fluxo writes nothing
# outside its data_dir (SQLite only; unused with PostgreSQL) and /tmp (mount an
# emptyDir there in Kubernetes).
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="fluxo" \
      org.opencontainers.image.description="Merchant cash-flow ledger and daily consolidated balances, served over gRPC." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/fluxo/fluxo"
COPY --from=build /out/fluxo /usr/local/bin/fluxo
# In a container, listen on every interface (the binary's own default is loopback),
# so gRPC asks for a bearer token like REST (`docker run` prints a development one;
# the chart sets "mesh" behind Istio), and log JSON lines. Everything else comes
# from FLUXO_* variables set by the chart.
ENV FLUXO_GRPC__LISTEN=0.0.0.0:50051 \
    FLUXO_GRPC__AUTH=jwt \
    FLUXO_GATEWAY__LISTEN=0.0.0.0:8080 \
    FLUXO_LOG__FORMAT=json
# /home/nonroot is owned by 65532 in the distroless image: `docker run <image>`
# with no configuration keeps its SQLite file in ./fluxo-data there.
WORKDIR /home/nonroot
USER 65532:65532
EXPOSE 50051 8080
ENTRYPOINT ["/usr/local/bin/fluxo"]
CMD ["serve"]
