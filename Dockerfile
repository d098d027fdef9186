# syntax=docker/dockerfile:1
#
# The gateway image: `docker build -t mqtt-gateway .` (or `docker compose build`).
#   build    compiles the release binary (`cargo build --release --locked`)
#   tests    the source and a prebuilt end-to-end suite, for the compose `tests` service
#   runtime  (the default) the binary alone on Debian slim, as a non-root user
#
# The toolchain is the one the project is tested with; the build and runtime images use the
# same Debian release, so the binary finds the glibc it was linked against.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS source
WORKDIR /src
COPY . .

FROM source AS build
# Cache mounts keep the crate registry and the target folder between builds (BuildKit); the
# binary is copied out of the cached folder into the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/mqtt-gateway /usr/local/bin/mqtt-gateway

FROM source AS tests
# No cache mounts here: the compiled suite must be in the image, so that `cargo test` in the
# container runs at once instead of compiling again.
RUN cargo test --locked --test e2e --no-run
CMD ["cargo", "test", "--locked", "--test", "e2e"]

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# A fixed uid/gid outside the range of Debian's system users, so volume permissions can be set
# from the host; no home and no shell.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway
COPY --from=build /usr/local/bin/mqtt-gateway /usr/local/bin/mqtt-gateway
# The system's CA certificates, which mqtts:// and wss:// brokers are checked against unless
# GATEWAY_MQTT_CA_FILE says otherwise. Debian slim has none; the build image has Debian's
# ca-certificates bundle, so it is copied rather than installed with apt-get here.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
USER 10001:10001
# In a container the API must be reachable from outside it; set GATEWAY_MQTT_URL to your broker.
ENV GATEWAY_LISTEN=0.0.0.0:8080
EXPOSE 8080
# The binary checks itself: GET /readyz on GATEWAY_LISTEN, exit 0 when 200 (connected to the
# broker and subscribed), 1 otherwise. No curl in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["mqtt-gateway", "healthcheck"]
ENTRYPOINT ["mqtt-gateway"]
CMD ["serve"]
