# syntax=docker/dockerfile:1
#
# quotagate's container image: the release binary on distroless, as non-root.
#
#   docker build -t quotagate .
#   docker run --rm -p 7480:7480 -p 7481:7481 quotagate
#   docker run --rm -v "$PWD/my.toml:/etc/quotagate/quotagate.toml:ro" \
#     -e QUOTAGATE_CONFIG=/etc/quotagate/quotagate.toml -p 7480:7480 -p 7481:7481 quotagate
#
# No Docker engine runs where this project is developed and tested, so this
# file has never been built there. .ci/check-dockerfile checks what can be
# checked without one; docs/operations.md says what that is.

# The toolchain CI builds and tests with (at least Cargo.toml's rust-version).
# Bookworm, like the runtime image, so the binary needs no newer glibc.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# Dependencies first, from the manifests and stub targets only: this layer is
# rebuilt when Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/admission.rs \
 && echo 'fn main() {}' > benches/keys_rss.rs \
 && echo 'fn main() {}' > benches/hunting_stream.rs \
 && cargo build --release --locked \
 && rm -rf src

# The real sources. COPY keeps their old modification times, which would make
# cargo keep the stub binary: touch them so it rebuilds the crate itself.
COPY src ./src
COPY config ./config
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && install -D -m 0755 target/release/quotagate /out/quotagate \
 && install -d -m 0750 /out/state

# glibc and libgcc, no shell, no package manager; user 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/quotagate /usr/local/bin/quotagate
COPY --from=build --chown=65532:65532 /out/state /var/lib/quotagate

# Listen on every interface inside the container (the built-in defaults are
# loopback). QUOTAGATE_CONFIG names a mounted file; unset, the built-in
# defaults run. [[listener]] addresses in a file are not overridden here.
# STATE_DIRECTORY (as systemd sets it) puts the forward proxy's local CA on
# the volume, in /var/lib/quotagate/ca, when a config turns the proxy on.
# STATE_DIRECTORY: where the default SQLite quota store keeps its file
# (quotagate-state.db), on the volume below.
ENV QUOTAGATE_LISTEN=0.0.0.0:7480 \
    QUOTAGATE_ADMIN_LISTEN=0.0.0.0:7481 \
    STATE_DIRECTORY=/var/lib/quotagate \
    RUST_LOG=info
USER 65532:65532
# 7480: the proxy listener; 7481: the admin listener (/healthz, /readyz, /metrics).
EXPOSE 7480 7481
VOLUME ["/var/lib/quotagate"]
# Distroless has no curl: the binary probes its own admin listener.
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/quotagate", "healthcheck", "--timeout", "3s", "http://127.0.0.1:7481/healthz"]
ENTRYPOINT ["/usr/local/bin/quotagate"]
