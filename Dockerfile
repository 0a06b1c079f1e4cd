# qemupatch build environment (Debian bookworm): everything needed to build
# QEMU (x86_64-softmmu) from a git checkout, a release tarball or Debian's
# repacked tarball, and to build the kvm_vmsocket guest module for the
# bookworm guest kernel.  qemupatch tags the image by a hash of this file,
# its build args and the base image, and rebuilds only when one changes.
#
# Build args:
#   KERNEL_HEADERS  Debian headers package(s) of the guest kernel(s)
#                   (qemupatch.toml [[kernel]] headers_packages)
#   MESON, PYCOTAP  versions from PyPI: repacked Debian tarballs drop QEMU's
#                   python/wheels, and bookworm's meson (1.0) is too old
#
# host-ca.crt is the host's CA bundle, so pip works behind a TLS-intercepting
# proxy; qemupatch puts it into the build context.
FROM debian:bookworm
ARG KERNEL_HEADERS="linux-headers-6.1.0-56-amd64"
ARG MESON=1.9.0
ARG PYCOTAP=1.3.1
ENV DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      bison bzip2 ca-certificates ccache device-tree-compiler flex gcc git \
      kmod libc6-dev libfdt-dev libglib2.0-dev libpixman-1-dev libslirp-dev \
      make ninja-build pkg-config python3 python3-pip python3-setuptools \
      python3-venv \
      ${KERNEL_HEADERS} \
 && rm -rf /var/lib/apt/lists/*
COPY host-ca.crt /usr/local/share/qemupatch/host-ca.crt
RUN pip install --no-cache-dir --break-system-packages \
      --cert /usr/local/share/qemupatch/host-ca.crt \
      "meson==${MESON}" "pycotap==${PYCOTAP}"
ENV PATH=/usr/lib/ccache:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CCACHE_DIR=/ccache
