#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian, as root:
#   clang, llvm, libbpf-dev  make generate (bpf2go compiles bpf/ with clang)
#   clang-format             make test checks bpf/ against bpf/.clang-format
#   bpftool                  tests check what is loaded and attached
#   haproxy                  the third-party SO_ORIGINAL_DST proxy test
#   iptables, nftables       tests check the pod has no rules; the benchmark's baseline
#   iproute2                 'ip netns' to look at test pods by hand; ss for make scale
#   util-linux               mount and setpriv: tests run the sidecar as a container would
#   prometheus               a real server scrapes the sidecar in the tests; promtool checks
#   etcd-server, containerd, runc, containernetworking-plugins, busybox-static
#                            make e2e-k8s: the single-node cluster and its test image
#   qemu-system-x86, xz-utils make test-kernel boots Debian's 6.1 and 6.12 kernels (with
#                            busybox-static; 6.12's modules are xz'd)
#   python3, musl-tools      DNS capture's tests resolve with glibc's getaddrinfo (from
#                            Python) and musl's (a static binary musl-gcc builds)
# and the Go modules. Idempotent: apt runs only for missing packages.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
	echo "scripts/deps.sh: needs root (apt-get, bpffs): run it as root or with sudo" >&2
	exit 1
fi

pkgs=(clang clang-format llvm libbpf-dev bpftool haproxy iptables nftables iproute2 util-linux prometheus make
	etcd-server containerd runc containernetworking-plugins busybox-static qemu-system-x86 xz-utils python3 musl-tools)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "installing: ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export PATH="$PATH:/usr/local/go/bin"
cd "$(dirname "$0")/.."
go mod download
