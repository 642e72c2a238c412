#!/usr/bin/env bash
# `make image`: build Dockerfile.unified with podman, no Docker engine and no container registry needed.
#
# - podman, buildah and mmdebstrap come from Debian (installed here with apt when missing and running as root).
# - The base (debian:bookworm-slim) is made from Debian's packages: `mmdebstrap --variant=minbase bookworm`, then
#   `podman import` as localhost/debian:bookworm-slim (once; kept in podman's storage).
# - RUN steps run with --isolation chroot --network host. Where this machine reaches PyPI through its own CA bundle
#   and pip configuration (and local wheel directories), those are mounted read-only into the RUN steps: the
#   Dockerfile stays a plain one (pip from PyPI on any machine with internet) and nothing of them enters the image.
#
# Environment: IMAGE (default omi-server:latest), STORAGE_DRIVER (default overlay; vfs where overlay cannot mount:
# it copies every layer in full), TORCH_INDEX_URL (passed as the build argument of the same name: a CPU variant),
# WORK (default /var/tmp/omi-image: the base's rootfs.tar and the generated pip.conf; never inside the repository).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-omi-server:latest}
STORAGE_DRIVER=${STORAGE_DRIVER:-overlay}
WORK=${WORK:-/var/tmp/omi-image}
BASE=localhost/debian:bookworm-slim
PODMAN=(podman --storage-driver "$STORAGE_DRIVER")

if ! command -v podman >/dev/null || ! command -v buildah >/dev/null || ! command -v mmdebstrap >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "image_build: podman, buildah and mmdebstrap are needed (apt-get install podman buildah mmdebstrap)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah mmdebstrap >/dev/null
fi
mkdir -p "$WORK"

if ! "${PODMAN[@]}" image exists "$BASE"; then
    t0=$(date +%s)
    mmdebstrap --quiet --variant=minbase bookworm "$WORK/rootfs.tar"
    "${PODMAN[@]}" import --quiet "$WORK/rootfs.tar" "$BASE" >/dev/null
    rm -f "$WORK/rootfs.tar"
    echo "image_build: base $BASE made from Debian's packages in $(( $(date +%s) - t0 )) s"
fi

# This machine's pip settings (files and PIP_* variables, as `pip config list` merges them) as one read-only
# /etc/pip.conf for the RUN steps, with the directories they name (CA bundle, constraints, local wheels/indexes).
MOUNTS=()
HOST_PIP=()
if [ -x .venv/bin/python ]; then HOST_PIP=(.venv/bin/python -m pip); elif command -v pip3 >/dev/null; then HOST_PIP=(pip3); fi
if [ ${#HOST_PIP[@]} -gt 0 ] && "${HOST_PIP[@]}" config list >"$WORK/pip-config.txt" 2>/dev/null \
        && [ -s "$WORK/pip-config.txt" ]; then
    {
        echo "[global]"
        # global.cert='/etc/ssl/certs/ca-certificates.crt' and :env:.find-links='/opt/wheels' -> cert = ...
        sed -n "s/^\(global\|install\|:env:\)\.\([a-z-]*\)='\(.*\)'\$/\2 = \3/p" "$WORK/pip-config.txt" \
            | grep -v '^\(no-cache-dir\|cache-dir\|require-virtualenv\|user\|target\|prefix\) ' \
            | tac | awk '!seen[$1]++' | tac  # set twice (a file, then a variable): the last wins, once
    } >"$WORK/pip.conf"
    # The CA bundle goes in beside the image's own /etc/ssl/certs (which ca-certificates must be free to write).
    CERT=$(sed -n 's/^cert = //p' "$WORK/pip.conf")
    if [ -n "$CERT" ] && [ -f "$CERT" ]; then
        sed -i 's|^cert = .*|cert = /etc/pip-build-ca.crt|' "$WORK/pip.conf"
        MOUNTS+=(-v "$CERT:/etc/pip-build-ca.crt:ro")
    fi
    MOUNTS+=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
    for dir in /etc/xdg/pip /opt/wheels /opt/pypi /opt/pypi-more; do
        [ -d "$dir" ] && MOUNTS+=(-v "$dir:$dir:ro")
    done
fi

BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE")
[ -n "${TORCH_INDEX_URL:-}" ] && BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")

t0=$(date +%s)
# --format docker keeps HEALTHCHECK (the OCI image format has no field for it).
"${PODMAN[@]}" build --isolation chroot --network host --format docker --layers \
    -f Dockerfile.unified "${BUILD_ARGS[@]}" "${MOUNTS[@]}" -t "$IMAGE" .
echo "image_build: built $IMAGE in $(( $(date +%s) - t0 )) s"
"${PODMAN[@]}" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$IMAGE"
