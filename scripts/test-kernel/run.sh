#!/usr/bin/env bash
# make test-kernel KERNEL=6.1: boots Debian's cloud kernel of that version
# under QEMU (software emulation: no /dev/kvm here) with a small initramfs
# (busybox, a static sluice, the loader package's tests built static, the
# tools they call, veth.ko) and runs there 'sluice check' (the whole BPF
# object must load and attach, the optional features be reported) and the
# loader's tests (install, pods sharing the node's programs, hostile SYNs,
# routes...: what needs a feature the kernel lacks skips, naming it).
# Prints the kernel's table and the tests' results; fails when either
# fails. KERNEL=6.1 is Debian 12's own kernel (its linux-image-cloud-amd64).
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

mkdir -p "$work"/initrd/{bin,proc,sys,dev,tmp,run,lib}
cp "$(command -v busybox)" "$work/initrd/bin/"
for a in sh mount poweroff cat insmod ip; do ln -s busybox "$work/initrd/bin/$a"; done
CGO_ENABLED=0 go build -o "$work/initrd/bin/sluice" ./cmd/sluice
CGO_ENABLED=0 go test -c -o "$work/initrd/bin/loader.test" ./loader
cp "$(find "$work/root/lib/modules" -name veth.ko)" "$work/initrd/lib/"
# The tools the tests call, with their libraries where they are on the host.
for tool in bash ss bpftool; do
	path=$(command -v "$tool")
	mkdir -p "$work/initrd$(dirname "$path")"
	cp "$path" "$work/initrd$path"
	ln -sf "$path" "$work/initrd/bin/$tool" 2>/dev/null || true
	for lib in $(ldd "$path" | grep -o '/[^ ]*'); do
		mkdir -p "$work/initrd$(dirname "$lib")"
		cp -n "$lib" "$work/initrd$lib"
	done
done
cat >"$work/initrd/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmp /run
mount -t tmpfs tmp /tmp
insmod /lib/veth.ko
ip link set lo up
export PATH=/bin:/usr/bin:/usr/sbin
echo "kernel: $(cat /proc/version)"
/bin/sluice check
echo "SLUICE-CHECK exit=$?"
cd /tmp && /bin/loader.test -test.v -test.count=1 2>&1 | grep -E '^(--- |FAIL|ok|PASS)|_test.go'
echo "SLUICE-LOADER exit=$?"
poweroff -f
INIT
chmod +x "$work/initrd/init"
(cd "$work/initrd" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$work/initrd.gz")

start=$(date +%s)
out=$(timeout 1200 qemu-system-x86_64 -m 2048 -smp 2 -nographic -no-reboot -nic none \
	-kernel "$vmlinuz" -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1" 2>&1 | tr -d '\r')
echo "$out" | sed -n 's/^.*\(kernel: Linux\)/\1/; /kernel: Linux/,/SLUICE-LOADER/p'
echo "booted $pkg under QEMU (TCG), ran check and the loader's tests in $(($(date +%s) - start)) s"
grep -q 'SLUICE-CHECK exit=0$' <<<"$out" || {
	echo "scripts/test-kernel: sluice check failed on $pkg (its output is above)" >&2
	exit 1
}
# grep's status, in the VM, is of the filter; the tests' verdict is theirs.
if grep -q -e '^--- FAIL' -e '^FAIL' <<<"$out" || ! grep -q '^PASS$' <<<"$out"; then
	echo "scripts/test-kernel: the loader's tests failed on $pkg (above)" >&2
	exit 1
fi
