#!/usr/bin/env bash
# What building in containers needs on a Debian (bookworm) machine with no
# Docker engine and no reachable registry.  Idempotent; run as root.
# Called by ci/setup-debian.sh (and so by .ci/run).
#
#   podman        serves the Docker REST API that qemupatch drives through the
#                 Docker SDK for Python (qemupatch starts a private
#                 "podman system service" per build and stops it after)
#   runc          crun, podman's default runtime here, fails with "cgroups in
#                 hybrid mode not supported"; qemupatch's private
#                 containers.conf selects runc when it is installed
#   debootstrap   makes debian:bookworm / debian:trixie base images from the
#                 machine's own Debian mirror when no registry can be pulled
#   fuse-overlayfs, uidmap   podman storage helpers
#   buildah       removes the working container podman keeps of an image build
#                 abandoned at its deadline (the tests clean theirs up)
#   ca-certificates  the host CA bundle qemupatch hands to pip in image builds
#
# Nothing else is configured system-wide: the runtime and the lowered
# ulimits (nofile=1024, nproc=1000; the defaults fail with "setrlimit:
# Operation not permitted" here) live in the private CONTAINERS_CONF that
# qemupatch/engine.py writes for its own service.
set -euo pipefail

packages=(podman buildah runc debootstrap fuse-overlayfs uidmap ca-certificates tar)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup-containers: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# The Docker SDK for Python is a qemupatch dependency (pyproject.toml), so
# "pip install -e ." brings it; nothing to do here.

# Sanity check with a deadline: the engine answers and can run runc.
if command -v podman >/dev/null; then
    timeout 60 podman --runtime runc info --format '{{.Host.OCIRuntime.Name}}' >/dev/null \
        || echo "setup-containers: warning: 'podman --runtime runc info' failed" >&2
fi
echo "setup-containers: ok (podman $(podman --version | awk '{print $3}'), runc, debootstrap)"
