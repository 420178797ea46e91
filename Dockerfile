# The Trellis node agent image: `trellis` on distroless/cc (glibc; no musl
# target can be installed where this project is built). The build stage runs
# `cargo xtask build`, the same release build CI runs (`cargo xtask test`).
#
#   docker build -t ghcr.io/trellis-mesh/trellis:0.1.0 .

# --- build -------------------------------------------------------------------
FROM docker.io/library/rust:1.95-bookworm AS build
# The kernel programs need the nightly toolchain whose LLVM (22) matches
# bpf-linker's, with rust-src for -Z build-std=core (docs/toolchain.md). It
# is pinned by date (the one whose rustc says "1.97.0-nightly (e50aa6fba
# 2026-05-19)") and linked as `nightly`, the name agent/build.rs uses; the
# build stops here if its LLVM is not the 22 that bpf-linker is built for.
ARG NIGHTLY=nightly-2026-05-20
RUN rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
 && rustup toolchain link nightly "$(rustc +"$NIGHTLY" --print sysroot)" \
 && rustc +nightly -vV | grep -q '^LLVM version: 22[.]'
WORKDIR /src
COPY . .
# xtask installs bpf-linker against the nightly toolchain's libLLVM, then
# builds `cargo build --release --locked --package trellis-agent`.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo xtask build \
 && install -D -m 0755 target/release/trellis /out/trellis

# --- runtime -----------------------------------------------------------------
# Root, not nonroot: the agent needs its capabilities (CAP_BPF, CAP_NET_ADMIN,
# CAP_SYS_ADMIN, CAP_PERFMON, CAP_SYS_PTRACE), given by the DaemonSet.
FROM gcr.io/distroless/cc-debian12:latest
COPY --from=build /out/trellis /usr/local/bin/trellis
# The CLI talks to the admin API on 127.0.0.1:15000 (kubectl exec ... -- trellis status).
ENTRYPOINT ["/usr/local/bin/trellis"]
CMD ["agent"]
