#!/usr/bin/env bash
# Set up a fresh Debian (bookworm) machine for qemupatch: the packages every
# stage needs and a virtualenv with qemupatch and its test dependencies.
# Idempotent; run as root (or with sudo).  Used by the README and .ci/run.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)

packages=(
    # git work and patch handling
    git perl xz-utils bzip2 tar ca-certificates
    # building QEMU on the host (the container build brings its own)
    gcc make ninja-build pkg-config libglib2.0-dev libpixman-1-dev flex bison
    libslirp-dev libfdt-dev device-tree-compiler ccache
    # Python
    python3 python3-venv python3-pip
    # guests: ROMs QEMU needs at run time, busybox for the initramfs
    qemu-system-data seabios busybox-static cpio kmod dpkg-dev
    # the distribution's own QEMU: the stock comparator in the boot tests
    qemu-system-x86
    # the nightly's HTML report, checked in a real browser (Selenium)
    chromium chromium-driver
)
# containers (podman, runc, debootstrap ...): ci/setup-containers.sh
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# Kernel headers of the bookworm guest kernels (qemupatch.toml), for host
# builds of the module (container builds install their own).
headers=$(python3 - "$here/qemupatch.toml" <<'PY'
import sys, tomllib
cfg = tomllib.load(open(sys.argv[1], "rb"))
print(" ".join(p for k in cfg.get("kernel", []) if k["suite"] == "bookworm"
               for p in k.get("headers_packages", [])))
PY
)
for p in $headers; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $headers; break; }
done

if [ -x "$here/ci/setup-containers.sh" ]; then
    "$here/ci/setup-containers.sh"
fi

if [ ! -x "$here/.venv/bin/python" ]; then
    python3 -m venv "$here/.venv"
fi
# meson 1.9.0 and pycotap: Debian's repacked QEMU tarballs drop python/wheels.
"$here/.venv/bin/pip" install -q -e "$here[test]" "meson==1.9.0" pycotap
echo "setup: ready ($("$here/.venv/bin/qemupatch" --help >/dev/null && echo qemupatch ok))"
