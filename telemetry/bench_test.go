package telemetry

import (
	"testing"

	"github.com/sluicemesh/sluice/podstate"
)

// BenchmarkHandle is the exporter's cost per flow: its open and close
// events decoded and counted.
func BenchmarkHandle(b *testing.B) {
	e := NewExporter(&events{}, Options{})
	open := event(1, podstate.FlowOpened, "198.18.2.2:8080", 0, 0)
	closed := event(1, podstate.FlowClosed, "198.18.2.2:8080", 100, 100)
	b.ReportAllocs()
	for i := range b.N {
		open.Cookie, closed.Cookie = uint64(i), uint64(i)
		e.handle(flowOf(open, e.clock))
		e.handle(flowOf(closed, e.clock))
	}
}
