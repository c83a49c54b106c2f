package sidecar

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// logBuffer is a logger whose lines a test reads while others write.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func testLogger(tb testing.TB) (*slog.Logger, *logBuffer) {
	tb.Helper()
	var b logBuffer
	return slog.New(slog.NewTextHandler(&b, &slog.HandlerOptions{Level: slog.LevelDebug})), &b
}

type fakeProxy struct{ drained atomic.Int64 }

func (p *fakeProxy) Shutdown(drain time.Duration) { p.drained.Store(int64(drain)) }

func TestServeStopsEveryPartWhenOneFails(t *testing.T) {
	log, logs := testLogger(t)
	var stopped atomic.Int32
	wait := func(ctx context.Context) error {
		<-ctx.Done()
		stopped.Add(1)
		return nil
	}
	boom := errors.New("listener broke")
	fail := func(context.Context) error { return boom }
	p := &fakeProxy{}
	err := serve(context.Background(), []runner{wait, fail, wait}, p, 3*time.Second, "127.0.0.1:15001", log)
	if !errors.Is(err, boom) {
		t.Fatalf("serve = %v, want %v", err, boom)
	}
	if n := stopped.Load(); n != 2 {
		t.Errorf("%d of 2 other parts stopped", n)
	}
	if time.Duration(p.drained.Load()) != 3*time.Second {
		t.Errorf("proxy drained for %v, want 3s", time.Duration(p.drained.Load()))
	}
	if strings.Contains(logs.String(), "draining open ones") {
		t.Errorf("a failure logged a drain:\n%s", logs)
	}
}

func TestServeDrainsWhenCanceled(t *testing.T) {
	log, logs := testLogger(t)
	ctx, cancel := context.WithCancel(context.Background())
	started := make(chan struct{})
	part := func(ctx context.Context) error {
		close(started)
		<-ctx.Done()
		return nil
	}
	go func() {
		<-started
		cancel()
	}()
	p := &fakeProxy{}
	if err := serve(ctx, []runner{part}, p, time.Second, "127.0.0.1:15001", log); err != nil {
		t.Fatalf("serve after a signal = %v, want nil", err)
	}
	if time.Duration(p.drained.Load()) != time.Second {
		t.Errorf("proxy drained for %v, want 1s", time.Duration(p.drained.Load()))
	}
	for _, want := range []string{`msg=listening addrs=127.0.0.1:15001`, `draining open ones" drain=1s`} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
}
