# Everything runs as root: tests and the demo build network namespaces,
# cgroups and BPF programs of their own.
GO ?= go
export PATH := $(PATH):/usr/local/go/bin

.PHONY: all build deps generate check-generate check-bpf vmlinux test fuzz demo bench bench-quick bench-node scale image e2e-k8s test-kernel

all: build

# sluice version names the commit (go's own VCS stamp may be off: -buildvcs).
COMMIT := $(shell git rev-parse HEAD 2>/dev/null)$(shell git status --porcelain 2>/dev/null | grep -q . && echo -modified)
LDFLAGS := -X main.commit=$(COMMIT)

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o bin/sluice ./cmd/sluice

# Installs Debian packages and Go modules; fast when they are there.
deps:
	bash scripts/deps.sh

# Rebuilds the committed BPF objects and Go bindings (needs clang) and the
# Grafana dashboard in deploy/grafana.
generate:
	$(GO) generate ./bpf/ ./telemetry/dashboard/

# Fails when the committed objects do not match the sources.
check-generate: generate
	@git diff --quiet -- bpf/ deploy/ || { git status --short -- bpf/ deploy/; \
		echo "generated files are stale: run 'make generate' and commit them"; exit 1; }

# The C is formatted by bpf/.clang-format, and every hook file compiles on its
# own (shared logic lives in headers, not in another hook's file).
BPF_SOURCES := $(filter-out bpf/sluice.c,$(wildcard bpf/*.c))
check-bpf:
	clang-format --dry-run --Werror bpf/*.c bpf/*.h
	@for f in $(BPF_SOURCES); do \
		clang -O2 -g -Wall -Werror -target bpfel -Ibpf/headers -c $$f -o /dev/null || \
			{ echo "$$f does not compile on its own: move what it borrows into a header"; exit 1; }; \
	done

# vmlinux.h is regenerated on purpose only: the objects are CO-RE, so the
# header need not match the running kernel.
vmlinux:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > bpf/headers/vmlinux.h

# Under CI the committed objects must already be current; locally they are rebuilt.
test: deps check-bpf $(if $(filter true,$(CI)),check-generate,generate)
	@unformatted=$$(gofmt -l .); [ -z "$$unformatted" ] || { echo "not gofmt'd: $$unformatted (run gofmt -w on them)"; exit 1; }
	$(GO) vet ./...
	$(GO) vet -tags demo ./...
	# One package at a time: test beds of different packages reuse the same
	# pod addresses, and the node's programs find a pod by its address.
	$(GO) test -tags demo -count=1 -timeout 30m -p 1 ./...
	# The loader's suite again as on a kernel without sk_psock.msg_tot_len
	# (Debian's 6.1): its paths run on every change, not only in make
	# test-kernel's VM (loader/main_test.go).
	SLUICE_TEST_KERNEL_WITHOUT=sk_psock.msg_tot_len $(GO) test -count=1 ./loader
	$(MAKE) fuzz FUZZTIME=100000x
	$(MAKE) bench-quick
	$(MAKE) bench-node

# Runs every Fuzz* function for FUZZTIME each; go test fuzzes one target per
# run. What a target finds is written to testdata/fuzz/ of its package:
# commit it with the fix, and it stays a regression test of plain go test.
# make test gives each target a count of inputs, not a time: with a time, Go
# before 1.27 can fail a target with "context deadline exceeded" when the
# time runs out on a loaded machine, having found nothing (go.dev/issue/75804;
# CI hit it once, on FuzzParseRouteFile).
FUZZTIME ?= 10s
fuzz:
	@grep -r --include='*_test.go' -o '^func Fuzz[A-Za-z0-9_]*' . | sort | \
	while IFS=: read -r file fn; do \
		pkg=$$(dirname "$$file"); target=$${fn#func }; \
		echo "fuzz $$pkg $$target for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$target$$" -fuzztime $(FUZZTIME) "$$pkg" || exit 1; \
	done

# The demo's test bed (throwaway pods and hosts) is never in bin/sluice.
demo: deps
	$(GO) build -tags demo -ldflags '$(LDFLAGS)' -o bin/sluice-demo ./cmd/sluice
	./bin/sluice-demo demo

# Boots each of Debian's kernels in KERNEL (6.1: Debian 12's own; 6.12: the
# newer one it ships) under QEMU and runs there 'sluice check', the loader
# package's tests and the e2e capture suite (scripts/test-kernel/run.sh says
# which): the object loads, pods install, capture steers and refuses, flows
# count, routes split, the agent collects and upgrades, as on the host. CI
# runs both after make test; software emulation, several minutes each.
KERNEL ?= 6.1 6.12
test-kernel: deps
	for k in $(KERNEL); do scripts/test-kernel/run.sh $$k || exit 1; done

# Every way of putting a sidecar in a pod's path, outbound and inbound, in
# rounds (docs/bench-method.md): results/bench.json, results/bench.png and
# results/haproxy.cfg. Run it alone: CPU/req counts the whole machine.
# BENCH_CPUS=0 pins everything to CPU 0; BENCH_FLAGS='-runs 7 -seconds 5'.
bench: deps build
	$(GO) build -o bin/bench ./scripts/bench
	$(if $(BENCH_CPUS),taskset -c $(BENCH_CPUS)) ./bin/bench -sluice bin/sluice $(BENCH_FLAGS)

# The regression guard make test (and so CI) runs, in under a minute: 40
# fresh pods, each installed after one iptables-restore + ip6tables-restore
# of Istio's rules in a fresh netns (the baseline, in the same run), then 40
# more installed by the guard's own process (warm: the install's work
# without a process's start, what the node's agent pays for a CNI plugin).
# It fails when an install's median over the baseline's passes
# MAX_INSTALL_RATIO (exec'd) or MAX_RESIDENT_RATIO (resident), or when one
# more idle pod adds more kernel memory than MAX_IDLE_KIB (its own maps and
# its entries in the node's). Today (2-core VM, Linux 6.18.44-fc): exec'd
# 0.58-0.73 (median 11-14 ms), resident 0.44-0.52 (11-12 ms), 14 KiB per
# idle pod. The resident floor is the kernel's: every write to a map of
# maps (a pod's maps joining the node's) returns after an RCU grace
# period, 8-16 ms on this kernel; the pod's nine writes are made at once
# so their waits overlap (one after the other they took 100 ms, ratio
# 3.5), with GOMAXPROCS raised meanwhile (loader.raiseProcs: a process
# that had been idle let them go two at a time, 0.59-0.83 here and
# 1.46-1.70 in bench-node). In earlier runs, on a kernel whose grace
# period took well under a millisecond, resident was 0.17-0.18 (2.7-3.1
# ms) and the limit was issue 28's goal, 0.25 (4x faster than
# iptables-restore); it is 0.9 now, today's plus room for noise (the grace
# period's 8-16 ms). Issue 28: 47 KiB
# before route maps were made by the first route and the handshake table
# shrank to 256; before that, 13 runs: ratio 5.3-7.5, 283 KiB). The limits
# are today's plus room for noise. Raise one only on purpose, saying why in
# the commit. To see it fail: make bench-quick MAX_IDLE_KIB=12.
MAX_INSTALL_RATIO ?= 2.5
MAX_RESIDENT_RATIO ?= 0.9
MAX_IDLE_KIB ?= 16
bench-quick: build
	$(GO) run ./scripts/scale -sluice bin/sluice -quick \
		-max-install-ratio $(MAX_INSTALL_RATIO) -max-resident-ratio $(MAX_RESIDENT_RATIO) \
		-max-idle-kib $(MAX_IDLE_KIB) -limits-from "the Makefile"

# The same guard on a node of 1,000 pods (about 3 minutes; make test runs
# it), with the same limits: an install must not slow down with the pods
# already there. On the kernel of earlier runs resident 0.17 (2.5 ms, as
# with 40 pods), exec'd 1.9. It was 0.30-0.36 (5 ms) while install read the
# pod's port range from /proc/sys, whose lookup walks a dcache entry per
# network namespace on the node: it is read from the kernel now
# (bpf/portrange.c). On 6.18.44-fc: exec'd 0.62-0.88, resident 0.42 (11 ms,
# p90 17 ms) with 1,000-2,000 pods; 1.46-1.70 (34 ms) before raiseProcs,
# which a bench-node limit of its own (2.2) allowed until the cause was
# found.
bench-node: build
	$(GO) run ./scripts/scale -sluice bin/sluice -quick -pods 1000 \
		-max-install-ratio $(MAX_INSTALL_RATIO) -max-resident-ratio $(MAX_RESIDENT_RATIO) \
		-max-idle-kib $(MAX_IDLE_KIB) -limits-from "the Makefile"

# Install time per pod against iptables-restore of Istio's rules, kernel
# memory of 1,000 idle pods and of a pod holding 10,000 connections, then
# how each cost grows, iptables (as istio-iptables writes it) beside Sluice
# in the same run: pods on the node (1-1,000), excluded CIDRs (0-2,000),
# held connections (1k-50k), canary routes (0-128). Every figure goes to
# results/scale.json, the series' plots to results/scale-*.png. A quick look:
# SCALE_FLAGS='-pods 20 -conns 100 -pod-points 1,10 -cidr-points 0,100 -held-points 1000 -route-points 0,1 -seconds 1' make scale
scale: deps build
	mkdir -p results
	$(GO) run ./scripts/scale -sluice bin/sluice -series all -json results/scale.json $(SCALE_FLAGS)

# The OCI image, built without Docker: results/sluice-image.tar (docker-archive),
# for `ctr -n k8s.io images import`. The binary is static: the image has no libc.
IMAGE_TAG ?= sluice:dev
IMAGE_ARCH ?= $(shell $(GO) env GOARCH)
image:
	CGO_ENABLED=0 GOARCH=$(IMAGE_ARCH) $(GO) build -trimpath -ldflags '-s -w $(LDFLAGS)' -o bin/sluice-static ./cmd/sluice
	$(GO) run ./scripts/image -binary bin/sluice-static -tag $(IMAGE_TAG) -arch $(IMAGE_ARCH) \
		-version "$$(git describe --always --dirty)" -out results/sluice-image.tar $(IMAGE_FLAGS)

# A real single-node Kubernetes (no registry, no Docker, no internet): builds
# the binaries once per version into /var/cache/sluice-e2e (about 6 minutes
# cold), applies deploy/'s manifests with the image from make image, checks
# capture, the drop-ins, the agent and a route end to end, and tears
# everything down to the host's baseline. CI runs it after make test.
e2e-k8s: deps image
	$(GO) build -o bin/e2e-k8s ./scripts/e2e-k8s
	./bin/e2e-k8s -sluice-image results/sluice-image.tar $(E2E_K8S_FLAGS)
