#!/bin/bash
# The VM tests' guest: QEMU and its kernel on the host, and a busybox
# initramfs whose /init (tests/vm/init) writes checksummed files to an ext4
# disk or checks such a disk, chosen on the kernel command line.
#
#   guest.sh install      as root: qemu-system-x86 and qemu-utils (10.x, from
#                         the backports suite: bookworm's own 7.2 would replace
#                         the qemu-utils 10 that qemu-nbd -B needs), busybox-static,
#                         e2fsprogs; the Debian cloud kernel .deb fetched into
#                         the cache (nothing is installed into /boot)
#   guest.sh build OUT    OUT/vmlinuz and OUT/initrd.gz from the cached kernel
#
# env: DISKFERRY_VM_CACHE (/var/cache/diskferry-vm) where the kernel .deb is kept
# A side apt configuration (lists in the cache) leaves the host's own apt
# sources and lists untouched.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CACHE=${DISKFERRY_VM_CACHE:-/var/cache/diskferry-vm}

side_apt() {
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ -n "$codename" ] && command -v apt-get >/dev/null || {
    echo "guest.sh: needs a Debian host with apt-get (found ${codename:-no codename})" >&2; exit 2; }
  local d=$CACHE/apt
  mkdir -p "$d"/lists/partial "$d"/archives/partial
  printf 'deb http://deb.debian.org/debian %s main\ndeb http://deb.debian.org/debian %s-backports main\n' \
    "$codename" "$codename" > "$d"/sources.list
  APT=(-o Dir::Etc::sourcelist="$d"/sources.list -o Dir::Etc::sourceparts=- -o Dir::State::lists="$d"/lists
       -o Dir::Cache::archives="$d"/archives)
  BACKPORTS=$codename-backports
  if [ -z "$(ls "$d"/lists 2>/dev/null | grep -v partial)" ]; then apt-get "${APT[@]}" update -qq; fi
}

cached_kernel() { ls -v "$CACHE"/linux-image-*-cloud-amd64_*.deb 2>/dev/null | tail -1; }

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null || return 1
  local major
  major=$(qemu-img --version | sed -n 's/^qemu-img version \([0-9]*\).*/\1/p')
  [ "${major:-0}" -ge 10 ]
}

busybox_ok() {
  local b
  b=$(command -v busybox) || return 1
  case "$(ldd "$(readlink -f "$b")" 2>&1 || true)" in *"not a dynamic"*) return 0;; *) return 1;; esac
}

install() {
  [ "$(id -u)" = 0 ] || { echo "guest.sh install: run as root" >&2; exit 2; }
  mkdir -p "$CACHE"
  if ! qemu_ok || ! busybox_ok || ! command -v mkfs.ext4 >/dev/null || ! command -v debugfs >/dev/null; then
    side_apt
    DEBIAN_FRONTEND=noninteractive apt-get "${APT[@]}" install -y -qq --no-install-recommends \
      -t "$BACKPORTS" qemu-system-x86 qemu-utils busybox-static e2fsprogs >/dev/null
  fi
  if [ -z "$(cached_kernel)" ]; then
    side_apt
    local pkg
    # the versioned package the cloud kernel's metapackage points at
    pkg=$(apt-cache "${APT[@]}" depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    [ -n "$pkg" ] || { echo "guest.sh: no linux-image-cloud-amd64 in the apt lists" >&2; exit 2; }
    (cd "$CACHE" && apt-get "${APT[@]}" download "$pkg" >/dev/null 2>&1)
  fi
  qemu_ok && busybox_ok && [ -n "$(cached_kernel)" ] || { echo "guest.sh install: incomplete" >&2; exit 2; }
  echo "qemu $(qemu-img --version | head -1 | awk '{print $3}'), kernel $(basename "$(cached_kernel)")"
}

build() {
  local out=${1:?usage: guest.sh build OUTDIR}
  local deb
  deb=$(cached_kernel)
  [ -n "$deb" ] || { echo "guest.sh build: no cached kernel in $CACHE: run 'tests/vm/guest.sh install' as root" >&2; exit 2; }
  busybox_ok || { echo "guest.sh build: needs a static busybox: run 'tests/vm/guest.sh install' as root" >&2; exit 2; }
  mkdir -p "$out"
  local kroot=$out/kroot
  rm -rf "$kroot"; dpkg-deb -x "$deb" "$kroot"
  local vmlinuz kver
  vmlinuz=$(ls "$kroot"/boot/vmlinuz-* | head -1); kver=${vmlinuz##*/vmlinuz-}
  local kmod=$kroot/lib/modules/$kver/kernel

  local t
  t=$(mktemp -d /tmp/diskferry-vm-initramfs.XXXXXX)
  trap 'rm -rf "$t"' RETURN
  mkdir -p "$t"/{bin,sbin,etc,proc,sys,dev,mnt,tmp,run,lib/modules}
  cp "$(readlink -f "$(command -v busybox)")" "$t"/bin/busybox
  for a in $("$t"/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$t"/bin/"$a"; done
  ln -sf /proc/mounts "$t"/etc/mtab
  # virtio-blk and the ACPI power button (QMP system_powerdown) are modules
  # in Debian's kernels; ext4, jbd2 and the 8250 serial port are built in.
  local m src
  for m in drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko \
           drivers/virtio/virtio_pci_legacy_dev.ko drivers/virtio/virtio_pci_modern_dev.ko \
           drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko \
           drivers/acpi/button.ko drivers/input/evdev.ko; do
    src=$kmod/$m
    if [ -f "$src" ]; then cp "$src" "$t"/lib/modules/
    elif [ -f "$src.xz" ]; then xz -dc "$src.xz" > "$t"/lib/modules/"$(basename "$m")"
    else echo "guest.sh build: the kernel lacks module $m" >&2; exit 2; fi
  done
  # the host's e2fsck (it must match the mkfs.ext4 that made the disk) and its libraries
  cp /sbin/e2fsck "$t"/sbin/e2fsck
  local lib
  for lib in $(ldd /sbin/e2fsck | awk '/=>/{print $3} /ld-linux/{print $1}'); do
    mkdir -p "$t$(dirname "$lib")"; cp -L "$lib" "$t$lib"
  done
  # the guest has no real-time clock worth trusting
  printf '[options]\n\tbroken_system_clock = true\n' > "$t"/etc/e2fsck.conf
  cp "$here"/init "$t"/init; chmod +x "$t"/init
  (cd "$t" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$out"/initrd.gz.tmp
  cp "$vmlinuz" "$out"/vmlinuz.tmp
  mv "$out"/initrd.gz.tmp "$out"/initrd.gz; mv "$out"/vmlinuz.tmp "$out"/vmlinuz
  rm -rf "$kroot"
  echo "guest: $out/vmlinuz ($kver), $out/initrd.gz ($(stat -c %s "$out"/initrd.gz) bytes)"
}

case "${1:-}" in
  install) install;;
  build) build "${2:-}";;
  *) echo "usage: guest.sh install | guest.sh build OUTDIR" >&2; exit 2;;
esac
