package telemetry

import (
	"errors"
	"testing"
	"time"
	"unsafe"

	dto "github.com/prometheus/client_model/go"
)

// Followers hold bounded memory: at most MaxFollowers of them, each
// buffering at most followBuffer flows; one whose buffer stays full for the
// follower timeout is evicted, and counted, while the others still get
// every flow.
func TestFollowersAreBounded(t *testing.T) {
	e := NewExporter(&events{}, Options{MaxFollowers: 2, FollowerTimeout: 50 * time.Millisecond})
	if size := followBuffer * int(unsafe.Sizeof(Flow{})); size > 64<<10 {
		t.Errorf("a follower buffers %d bytes, want at most 64 KiB", size)
	}
	stuck, err := e.Follow()
	if err != nil {
		t.Fatal(err)
	}
	reader, err := e.Follow()
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Stop()
	if _, err := e.Follow(); !errors.Is(err, ErrTooManyFollowers) {
		t.Fatalf("a third follower: %v, want ErrTooManyFollowers", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for sent := 0; ; sent++ {
		select {
		case <-stuck.Evicted():
			if got := len(reader.Events()); got != 1 {
				t.Errorf("the reading follower holds %d flows, want the 1 it did not read yet", got)
			}
			var m dto.Metric
			if e.evicted.Write(&m); m.GetCounter().GetValue() != 1 {
				t.Errorf("sluice_flow_followers_evicted_total = %v, want 1", m.GetCounter().GetValue())
			}
			if _, err := e.Follow(); err != nil {
				t.Errorf("after the eviction a new follower: %v", err)
			}
			return
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stuck follower was never evicted after %d flows", sent)
		}
		time.Sleep(time.Millisecond) // the pace of the flows, not a wait
		for len(reader.Events()) > 0 {
			<-reader.Events()
		}
		e.handle(Flow{Cookie: uint64(sent), State: StateFailed, Direction: Outbound})
	}
}

// A follower's stream ends when its exporter stops (the agent stops
// exporting a pod that went): it is not left waiting for events that will
// never come, and a new follower is refused.
func TestFollowersEndWithTheExporter(t *testing.T) {
	e := NewExporter(&events{}, Options{})
	f, err := e.Follow()
	if err != nil {
		t.Fatal(err)
	}
	e.Stop() // the pod went
	select {
	case <-f.Evicted():
	case <-time.After(5 * time.Second):
		t.Fatal("the follower still waits after its exporter stopped")
	}
	if _, err := e.Follow(); !errors.Is(err, ErrStopped) {
		t.Errorf("a follower after the exporter stopped: %v, want ErrStopped", err)
	}
	f.Stop() // after the end too
}
