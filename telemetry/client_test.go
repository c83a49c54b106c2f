package telemetry

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// served serves a real exporter's handler, as the agent does for a pod.
func served(t *testing.T, opts Options) (*Exporter, string) {
	t.Helper()
	e := NewExporter(&events{}, opts)
	srv := httptest.NewServer(e.Handler())
	t.Cleanup(srv.Close)
	return e, srv.URL
}

func openFlow(cookie uint64, dst string) Flow {
	return Flow{Cookie: cookie, State: StateOpen, Direction: Outbound, Start: time.Now(),
		Destination: netip.MustParseAddrPort(dst), OriginalDst: netip.MustParseAddrPort(dst), ViaSidecar: true}
}

func TestFetchFlowsReadsTheOpenFlows(t *testing.T) {
	e, addr := served(t, Options{})
	e.handle(openFlow(1, "198.18.2.2:8080"))
	e.handle(openFlow(2, "198.18.3.2:80"))
	flows, err := FetchFlows(t.Context(), addr, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(flows) != 2 || flows[0].Cookie != 1 || flows[1].OriginalDst.String() != "198.18.3.2:80" || !flows[1].ViaSidecar {
		t.Fatalf("FetchFlows = %+v, want the two open flows in order", flows)
	}
}

func TestFetchFlowsSaysWhatIsWrong(t *testing.T) {
	notAgent := httptest.NewServer(http.NotFoundHandler())
	defer notAgent.Close()
	gone := httptest.NewServer(nil)
	gone.Close()
	for _, tc := range []struct{ addr, want string }{
		{notAgent.URL, "404 Not Found"},
		{gone.URL, "is 'sluice agent' running there?"},
		{"http://[::1", "address \"http://[::1\": missing ']' in host"},
	} {
		_, err := FetchFlows(t.Context(), tc.addr, "")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("FetchFlows(%s) = %v, want %q", tc.addr, err, tc.want)
		}
	}
	var ae *AddrError
	if _, err := FetchFlows(t.Context(), "http://a b", ""); !errors.As(err, &ae) || ae.Addr != "http://a b" {
		t.Errorf("a malformed address: %v, want an AddrError", err)
	}
	if _, err := FetchFlows(t.Context(), gone.URL, ""); errors.As(err, &ae) {
		t.Errorf("an agent that is down: %v, want no AddrError", err)
	}
}

// FollowFlows gets each flow as the exporter handles it, as sent and
// decoded; the stream ends without error when ctx does.
func TestFollowFlowsGetsEachFlow(t *testing.T) {
	e, addr := served(t, Options{})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	stream, err := FollowFlows(ctx, addr, "")
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	// The follower is registered before the answer's header is sent.
	closed := openFlow(7, "198.18.2.2:8080")
	e.handle(closed)
	closed.State, closed.End = StateClosed, "fin"
	e.handle(closed)
	e.handle(Flow{Cookie: 8, State: StateFailed, Direction: Outbound, End: "refused"})
	for _, want := range []Flow{{Cookie: 7, State: StateClosed}, {Cookie: 8, State: StateFailed}} {
		if !stream.Next() {
			t.Fatalf("stream ended before flow %d: %v", want.Cookie, stream.Err())
		}
		if !strings.HasPrefix(string(stream.Bytes()), "{") {
			t.Errorf("raw event %q, want a JSON object", stream.Bytes())
		}
		f, err := stream.Flow()
		if err != nil || f.Cookie != want.Cookie || f.State != want.State {
			t.Fatalf("flow %+v, %v; want cookie %d %s", f, err, want.Cookie, want.State)
		}
	}
	cancel()
	if stream.Next() {
		t.Fatal("a flow after ctx ended")
	}
	if err := stream.Err(); err != nil {
		t.Errorf("Err after ctx ended = %v, want nil", err)
	}
}

func TestFollowFlowsRefusedWhenFull(t *testing.T) {
	_, addr := served(t, Options{MaxFollowers: 1})
	first, err := FollowFlows(t.Context(), addr, "")
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	_, err = FollowFlows(t.Context(), addr, "")
	if err == nil || !strings.Contains(err.Error(), "503 Service Unavailable") || !strings.Contains(err.Error(), "try again later") {
		t.Fatalf("a follower too many: %v, want 503 with the server's reason", err)
	}
}

// A stream the agent ends says so: it stopped, the pod went, or it dropped
// the follower.
func TestFollowFlowsSaysWhenTheAgentEndsIt(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte(`{"cookie":1,"state":"open"}` + "\n"))
	}))
	defer srv.Close()
	stream, err := FollowFlows(t.Context(), srv.URL, "")
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	for stream.Next() {
	}
	if err := stream.Err(); err == nil || !strings.Contains(err.Error(), "ended the flows stream") {
		t.Fatalf("Err = %v, want the stream's end explained", err)
	}
}
