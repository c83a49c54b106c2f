package agent

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/podstate"
	"github.com/sluicemesh/sluice/telemetry"
)

// benchNetns is the network namespace cookie the benchmark's pod has.
const benchNetns = 42

// benchPod gives f one pod, exporting to no sockets (no sock_diag) and
// reading no counters.
func benchPod(f *flowExport) {
	exp := telemetry.NewExporter(noCounters{}, telemetry.Options{Logger: quiet, InNetns: func(func() error) error { return nil }})
	f.pods[benchNetns] = &podFlows{in: loader.Installed{Cgroup: "/bench", NetnsCookie: benchNetns}, exp: exp}
}

type noCounters struct{}

func (noCounters) Counters() (map[string]uint64, error) { return nil, nil }

// BenchmarkFlowEvents is the agent's work per flow event: "handle" hands
// decoded events to a pod's exporter, which counts them; "ring" reads
// events the kernel wrote into a real ring (a BPF program writes them, as
// sockops does), decodes them and hands them over. Run with -cpu 1 for
// one CPU's capacity (docs/ARCHITECTURE.md, "Flow events"):
//
//	go test ./agent -run '^$' -bench FlowEvents -cpu 1
func BenchmarkFlowEvents(b *testing.B) {
	b.Run("handle", func(b *testing.B) {
		f := newFlowExport(New(Options{Logger: quiet}))
		benchPod(f)
		ev := podstate.FlowEvent{Kind: podstate.FlowOpened, Local: netip.MustParseAddrPort("198.18.1.2:40000"), Remote: netip.MustParseAddrPort("198.18.2.2:8080"),
			OriginalDst: netip.MustParseAddrPort("198.18.2.2:8080"), ViaSidecar: true, StartNs: 1, EndNs: 2, End: podstate.EndFin}
		i := uint64(0)
		for b.Loop() {
			i++
			ev.Cookie, ev.Kind = i/2, podstate.FlowOpened
			if i%2 == 1 {
				ev.Kind = podstate.FlowClosed
			}
			f.dispatch(benchNetns, ev)
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	})
	b.Run("ring", func(b *testing.B) {
		testbed.RequirePrivileged(b)
		root, err := os.MkdirTemp("/sys/fs/bpf", "sluice-bench-")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(root) })
		ring, write := benchRing(b, root)
		defer ring.Close()
		flows, err := loader.OpenNodeFlows(root)
		if err != nil {
			b.Fatal(err)
		}
		defer flows.Close()
		f := newFlowExport(New(Options{PinRoot: root, Logger: quiet}))
		benchPod(f)
		// A batch fills a third of the ring: it never overflows.
		const batch = 2000
		for done := 0; done < b.N; done += batch {
			n := min(batch, b.N-done)
			b.StopTimer()
			write(n)
			b.StartTimer()
			for range n {
				netns, ev, err := flows.Next(time.Second)
				if err != nil {
					b.Fatal(err)
				}
				f.dispatch(netns, ev)
			}
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	})
}

// benchRing pins a 1 MiB ring where the agent finds the node's flow ring
// under root, and returns a writer of n flow events into it (a socket
// filter program run n times, each writing one opened flow of
// the benchmark's pod).
func benchRing(b *testing.B, root string) (*ebpf.Map, func(n int)) {
	dir := filepath.Join(root, "node", bpf.ObjectHash())
	if err := os.MkdirAll(dir, 0o700); err != nil {
		b.Fatal(err)
	}
	ring, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.RingBuf, MaxEntries: 1 << 20})
	if err != nil {
		b.Fatal(err)
	}
	if err := ring.Pin(filepath.Join(dir, bpf.SluiceMapFlowEvents)); err != nil {
		b.Fatal(err)
	}
	ev := bpf.SluiceFlowEvent{Cookie: 7, Kind: uint8(bpf.SluiceFlowKindFLOW_OPEN), NetnsCookie: benchNetns,
		StartNs: 1, EndNs: 2, LocalPort: 40000, RemotePort: 8080}
	size := int(unsafe.Sizeof(ev))
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&ev)), size)
	// The event on the stack, a word at a time, then bpf_ringbuf_output.
	var insns asm.Instructions
	for off := 0; off < size; off += 8 {
		w := binary.NativeEndian.Uint64(raw[off:])
		insns = append(insns,
			asm.LoadImm(asm.R1, int64(w), asm.DWord),
			asm.StoreMem(asm.RFP, int16(off-size), asm.R1, asm.DWord))
	}
	insns = append(insns,
		asm.LoadMapPtr(asm.R1, ring.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, int32(-size)),
		asm.Mov.Imm(asm.R3, int32(size)),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnRingbufOutput.Call(),
		asm.Mov.Imm(asm.R0, 0),
		asm.Return())
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SocketFilter, License: "GPL", Instructions: insns})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { prog.Close() })
	packet := make([]byte, 64)
	return ring, func(n int) {
		if _, err := prog.Run(&ebpf.RunOptions{Data: packet, Repeat: uint32(n)}); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			b.Fatal(err)
		}
	}
}
