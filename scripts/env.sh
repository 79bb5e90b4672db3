# Shared settings for hugepoke's scripts. Source it; do not run it.
# Everything built or downloaded lives in $HP_CACHE, outside the repo, so a
# fresh clone (and CI) reuses it.

HP_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HP_CACHE=${HUGEPOKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hugepoke}

# Pinned versions.  The kernel is Debian's linux-source-7.2; if the pinned
# Debian revision disappears from the archive, set HP_KERNEL_DEB_VERSION to any
# other 7.2.y revision that the private apt lists show (see Documentation/build.md).
HP_KERNEL_SERIES=7.2
HP_KERNEL_DEB_VERSION=${HP_KERNEL_DEB_VERSION:-7.2.12-1~bpo13+1}
HP_RUST_SRC_VERSION=1.95.0
HP_BINDGEN_VERSION=0.72.1
HP_VIRTME_NG_VERSION=${HP_VIRTME_NG_VERSION:-1.42}
HP_LLVM=19
# The guests' QEMU: Debian's bookworm-backports build (scripts/setup); if a
# revision leaves the archive, set these to the one the private lists show.
HP_QEMU_VERSION=${HP_QEMU_VERSION:-1:10.0.2+ds-2+deb13u1~bpo12+1}
HP_SEABIOS_VERSION=${HP_SEABIOS_VERSION:-1.16.3-2~bpo12+1}

HP_TOOLS=$HP_CACHE/tools
HP_APT=$HP_CACHE/apt
HP_QEMU_DIR=$HP_TOOLS/qemu-$HP_QEMU_VERSION

export LIBCLANG_PATH=/usr/lib/llvm-$HP_LLVM/lib
export RUST_LIB_SRC=$HP_TOOLS/rust-src/usr/src/rustc-$HP_RUST_SRC_VERSION/library
export PATH=$HP_TOOLS/bin:$HP_TOOLS/venv/bin:$HOME/.cargo/bin:$PATH

say() { printf '\033[1m[hugepoke]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[hugepoke] error:\033[0m %s\n' "$*" >&2; exit 1; }
HP_KERNEL_SRC=$HP_CACHE/linux-source/$HP_KERNEL_DEB_VERSION
HP_KFLAVOUR=${HP_KFLAVOUR:-base}
HP_KDIR=$HP_CACHE/kernel/build-$HP_KERNEL_DEB_VERSION-$HP_KFLAVOUR
# The kernel's mm selftests, built by scripts/build-selftests.
HP_SELFTESTS=$HP_CACHE/selftests/mm-$HP_KERNEL_DEB_VERSION
# The compiler a flavour is built with (kernel/FLAVOUR.toolchain: make variables);
# the module must be built with the same one.
HP_KMAKE=$(cat "$HP_ROOT/kernel/$HP_KFLAVOUR.toolchain" 2>/dev/null || echo "LLVM= CC=gcc")
