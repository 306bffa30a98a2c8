#!/usr/bin/env bash
# Builds the small Linux guest used by the QEMU vhost-user tests (virtio-pci) and by the kvm-host Linux boot
# (Hyper-V VMBus drivers), plus a busybox initramfs whose /init runs the test named by `vtest=` on the
# kernel command line. Output: ${VMBUS_KERNEL_CACHE:-$HOME/.cache/vmbus-kernel}/<hash>/{bzImage,vmlinux,
# initramfs.cpio.gz}; the hash covers this script and the config fragment, so a cache hit is instant.
# The LAST line on stdout is that directory. Everything else goes to stderr.
#   scripts/build-guest-kernel.sh
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
script="$repo/scripts/build-guest-kernel.sh"
fragment="$repo/../shared/reference/tiny-hv-kernel.fragment"
cache="${VMBUS_KERNEL_CACHE:-$HOME/.cache/vmbus-kernel}"
log() { printf '[build-guest-kernel] %s\n' "$*" >&2; }

[ -f "$fragment" ] || { log "config fragment missing: $fragment"; exit 1; }

# What the QEMU tests need on top of the Hyper-V fragment. Part of the hash (this file is hashed).
qemu_options="
CONFIG_PCI_MSI=y
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_BLK=y
CONFIG_NET_CORE=y
CONFIG_VIRTIO_NET=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_ACPI=y
CONFIG_PROC_SYSCTL=y
CONFIG_PACKET=y
CONFIG_INET=y
"

hash=$(cat "$script" "$fragment" | sha256sum | cut -c1-16)
out="$cache/$hash"
if [ -f "$out/bzImage" ] && [ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio.gz" ]; then
    log "cache hit"
    echo "$out"
    exit 0
fi

need=()
for p in linux-source-6.1 bison flex libelf-dev bc busybox-static cpio xz-utils gcc make; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo -n)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo_cmd[@]}" apt-get update -q >&2 </dev/null
    "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${need[@]}" >&2 </dev/null
fi

mkdir -p "$cache"
# A half-finished build stays in its temp dir; only a complete one is renamed into place.
work=$(mktemp -d "$cache/.build-$hash.XXXXXX")
trap 'rm -rf "$work"' EXIT
started=$SECONDS

# The kernel has its own cache entry keyed by its config inputs only, so changing /init below
# rebuilds the initramfs in seconds instead of the kernel in minutes.
cfg="$work/wanted.config"
{ grep -E '^(CONFIG_|# CONFIG_)' "$fragment"; printf '%s\n' "$qemu_options"; } >"$cfg"
khash=$(sha256sum <"$cfg" | cut -c1-16)
kdir="$cache/kernel-$khash"

build_kernel() {
    log "unpacking linux-source-6.1 into $work"
    tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
    src="$work/linux-source-6.1"

    log "configuring (tinyconfig + fragment + virtio)"
    make -C "$src" -s tinyconfig >&2
    (cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "$cfg" >&2)
    make -C "$src" -s olddefconfig >&2

    # merge_config drops options whose dependencies are missing without failing: check every wanted one.
    missing=()
    while read -r line; do
        case "$line" in
        CONFIG_*=y) grep -qx "$line" "$src/.config" || missing+=("$line") ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }
            opt=${opt%% *}
            ! grep -q "^$opt=" "$src/.config" || missing+=("$line")
            ;;
        esac
    done <"$cfg"
    if [ ${#missing[@]} -gt 0 ]; then
        log "FAIL: options not in the final .config: ${missing[*]}"
        exit 1
    fi

    log "building bzImage (make -j2)"
    make -C "$src" -s -j2 bzImage >&2
    log "kernel built in $((SECONDS - started)) s"
    kstage="$work/kernel"
    mkdir -p "$kstage"
    cp "$src/arch/x86/boot/bzImage" "$src/vmlinux" "$kstage/"
    cp "$src/.config" "$kstage/config"
    gcc -O1 -o "$kstage/gen_init_cpio" "$src/usr/gen_init_cpio.c"
    rm -rf "$kdir" "$src"
    mv "$kstage" "$kdir"
}

if [ -f "$kdir/bzImage" ] && [ -f "$kdir/vmlinux" ] && [ -x "$kdir/gen_init_cpio" ]; then
    log "kernel cache hit: $kdir"
else
    build_kernel
fi

log "building initramfs"
root="$work/initramfs"
mkdir -p "$root"
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
# Guest side of the vhost-user / kvm-host tests; the test is chosen by vtest= on the kernel command line.
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp

arg() { sed -n "s/.*\\b$1=\\([^ ]*\\).*/\\1/p" /proc/cmdline; }
done_() { echo "VTEST $*"; sync; poweroff -f; reboot -f; sleep 60; }
VT=$(arg vtest)
DISK=$(arg vtest_disk); DISK=${DISK:-/dev/vda}
MIB=$(arg vtest_mib); MIB=${MIB:-4}
PASSES=$(arg vtest_passes); PASSES=${PASSES:-5}
NCPU=$(nproc)
SLICE=$((MIB / NCPU))

WAIT=$(arg vtest_wait); WAIT=${WAIT:-10}
# Devices probe asynchronously; wait up to vtest_wait seconds (slow emulated VMMs want more).
wait_dev() {
    i=0
    while [ ! -e "$1" ] && [ $i -lt $((WAIT * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    [ -e "$1" ]
}

# One pass: random data written over the first MIB MiB at offset SEEK MiB, flushed, the page cache
# dropped so the read-back comes from the device, then compared.
blk_pass() {
    rm -f /tmp/back /tmp/err
    dd if=/dev/urandom of=/tmp/pat bs=1M count="$MIB" 2>/dev/null || return 1
    echo "VTEST write offset_mib $1"
    # One dd per CPU, pinned, each on its slice: with a multi-queue disk every queue carries I/O.
    c=0
    while [ $c -lt "$NCPU" ]; do
        taskset $((1 << c)) dd if=/tmp/pat of="$DISK" bs=1M skip=$((c * SLICE)) seek=$(($1 + c * SLICE)) \
            count=$SLICE conv=fsync 2>/dev/null || echo "write failed" >/tmp/err &
        c=$((c + 1))
    done
    wait
    sync
    blockdev --flushbufs "$DISK"
    echo 3 >/proc/sys/vm/drop_caches
    c=0
    while [ $c -lt "$NCPU" ]; do
        taskset $((1 << c)) dd if="$DISK" of=/tmp/back bs=1M skip=$(($1 + c * SLICE)) seek=$((c * SLICE)) \
            count=$SLICE conv=notrunc 2>/dev/null || echo "read failed" >/tmp/err &
        c=$((c + 1))
    done
    wait
    [ ! -e /tmp/err ] || { cat /tmp/err; return 1; }
    cmp /tmp/pat /tmp/back || { echo "verify mismatch"; return 1; }
    echo "VTEST md5 $(md5sum </tmp/pat | cut -d' ' -f1) offset_mib $1 mib $MIB"
}

case "$VT" in
blk)
    wait_dev "$DISK" || done_ "blk FAIL no $DISK"
    echo "VTEST blk size_bytes $(blockdev --getsize64 "$DISK") ro $(blockdev --getro "$DISK")"
    echo "VTEST blk queues $(ls "/sys/block/${DISK#/dev/}/mq" | wc -l) cpus $NCPU"
    if [ "$(arg vtest_ro)" = 1 ]; then
        dd if="$DISK" of=/tmp/back bs=1M count=1 2>/dev/null || done_ "blk FAIL read"
        if dd if=/dev/zero of="$DISK" bs=4k count=1 conv=fsync 2>/dev/null; then
            done_ "blk FAIL write to read-only disk succeeded"
        fi
        done_ "blk ok readonly"
    fi
    blk_pass 0 || done_ "blk FAIL pass"
    done_ "blk ok"
    ;;
blkloop)
    wait_dev "$DISK" || done_ "blkloop FAIL no $DISK"
    p=1
    while [ $p -le "$PASSES" ]; do
        echo "VTEST pass $p start"
        blk_pass $(((p - 1) * MIB)) || done_ "blkloop FAIL pass $p"
        echo "VTEST pass $p ok"
        p=$((p + 1))
    done
    done_ "blkloop ok passes $PASSES"
    ;;
net)
    IP=$(arg vtest_ip); PEER=$(arg vtest_peer); PORT=$(arg vtest_port); PORT=${PORT:-5000}
    wait_dev /sys/class/net/eth0 || done_ "net FAIL no eth0"
    ip link set lo up
    ip addr add "$IP" dev eth0 && ip link set eth0 up || done_ "net FAIL ip setup"
    echo "VTEST net mac $(cat /sys/class/net/eth0/address)"
    ping -c 3 -W 5 "$PEER" || done_ "net FAIL ping $PEER"
    dd if=/dev/urandom of=/tmp/up bs=1k count=512 2>/dev/null
    echo "VTEST net up_md5 $(md5sum </tmp/up | cut -d' ' -f1)"
    # The host's listener reads to EOF (nc half-closes after stdin EOF) and closes.
    nc "$PEER" "$PORT" </tmp/up >/dev/null || done_ "net FAIL upload"
    nc "$PEER" $((PORT + 1)) </dev/null >/tmp/down || done_ "net FAIL download"
    echo "VTEST net down_md5 $(md5sum </tmp/down | cut -d' ' -f1) bytes $(wc -c </tmp/down)"
    done_ "net ok"
    ;;
hv)
    for d in /sys/bus/vmbus/devices/*; do
        [ -e "$d/class_id" ] && echo "VTEST hv vmbus $(basename "$d") class $(cat "$d/class_id")"
    done
    if wait_dev /dev/sda; then
        DISK=/dev/sda MIB=$NCPU SLICE=1
        if blk_pass 0; then echo "VTEST hv disk ok"; else echo "VTEST hv disk FAIL"; fi
    else
        echo "VTEST hv disk none"
    fi
    IP=$(arg vtest_ip); PEER=$(arg vtest_peer)
    [ -z "$IP$PEER" ] || wait_dev /sys/class/net/eth0 || true
    if [ -e /sys/class/net/eth0 ]; then
        ip link set eth0 up
        [ -n "$IP" ] && ip addr add "$IP" dev eth0
        if [ -n "$PEER" ]; then
            if ping -c 3 -W 5 "$PEER"; then echo "VTEST hv net ok"; else echo "VTEST hv net FAIL ping"; fi
        else
            echo "VTEST hv net up $(cat /sys/class/net/eth0/address)"
        fi
    else
        echo "VTEST hv net none"
    fi
    done_ "hv done"
    ;;
*)
    echo "VTEST no vtest= on the command line; shell on the console"
    exec sh
    ;;
esac
INIT
chmod 755 "$root/init"
# gen_init_cpio makes the device nodes without root and keeps /dev/console for the kernel's first open.
cat >"$work/initramfs.list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /bin 0755 0 0
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 01777 0 0
file /bin/busybox /bin/busybox 0755 0 0
file /init $root/init 0755 0 0
EOF
"$kdir/gen_init_cpio" "$work/initramfs.list" | gzip -9 >"$work/initramfs.cpio.gz"

stage="$work/out"
mkdir -p "$stage"
# Hard links where the file system allows: the kernel files are immutable once built.
cp -l "$kdir/bzImage" "$kdir/vmlinux" "$kdir/config" "$stage/" 2>/dev/null ||
    cp "$kdir/bzImage" "$kdir/vmlinux" "$kdir/config" "$stage/"
cp "$work/initramfs.cpio.gz" "$stage/"
rm -rf "$out"
mv "$stage" "$out"
log "done in $((SECONDS - started)) s: $out"
echo "$out"
