#!/usr/bin/env bash
# make test-kernel KERNEL=6.1: boots Debian's cloud kernel of that version
# under QEMU (software emulation: no /dev/kvm here) with a small initramfs
# (busybox, a static sluice) and runs 'sluice check' inside: the whole BPF
# object must load and attach there, and the optional features be reported.
# Prints the kernel's table and fails when the core cannot work.
# KERNEL=6.1 is Debian 12's own kernel (its linux-image-cloud-amd64).
set -euo pipefail
kernel=${1:?usage: run.sh KERNEL (e.g. 6.1)}
cd "$(dirname "$0")/../.."
export PATH="$PATH:/usr/local/go/bin"

case "$kernel" in
6.1) meta=linux-image-cloud-amd64 ;;
*)
	echo "scripts/test-kernel: no Debian package known for kernel $kernel: use KERNEL=6.1" >&2
	exit 2
	;;
esac
for tool in qemu-system-x86_64 busybox; do
	command -v "$tool" >/dev/null || {
		echo "scripts/test-kernel: $tool missing: run scripts/deps.sh" >&2
		exit 2
	}
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-/ {print $2; exit}')
[[ -n "$pkg" ]] || {
	echo "scripts/test-kernel: cannot resolve $meta (apt-get update?)" >&2
	exit 2
}
(cd "$work" && apt-get download -q "$pkg" 2>/dev/null >/dev/null) || {
	echo "scripts/test-kernel: apt-get download $pkg failed" >&2
	exit 2
}
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"
vmlinuz=$(ls "$work"/root/boot/vmlinuz-*)

mkdir -p "$work"/initrd/{bin,proc,sys,dev,tmp}
cp "$(command -v busybox)" "$work/initrd/bin/"
for a in sh mount poweroff cat; do ln -s busybox "$work/initrd/bin/$a"; done
CGO_ENABLED=0 go build -o "$work/initrd/bin/sluice" ./cmd/sluice
cat >"$work/initrd/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "kernel: $(cat /proc/version)"
/bin/sluice check
echo "SLUICE-TEST-KERNEL exit=$?"
poweroff -f
INIT
chmod +x "$work/initrd/init"
(cd "$work/initrd" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$work/initrd.gz")

start=$(date +%s)
out=$(timeout 600 qemu-system-x86_64 -m 1024 -smp 2 -nographic -no-reboot -nic none \
	-kernel "$vmlinuz" -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1" 2>&1 | tr -d '\r')
echo "$out" | sed -n 's/^.*\(kernel: Linux\)/\1/; /kernel: Linux/,/SLUICE-TEST-KERNEL/p'
echo "booted $pkg under QEMU (TCG) in $(($(date +%s) - start)) s"
grep -q 'SLUICE-TEST-KERNEL exit=0$' <<<"$out" || {
	echo "scripts/test-kernel: sluice check failed on $pkg (its output is above)" >&2
	exit 1
}
