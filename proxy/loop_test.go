package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// These tests run the event loops on loopback with no kernel redirect: the
// original destination comes from a stand-in for SO_ORIGINAL_DST. The
// end-to-end tests in cmd/sluice run the same proxy behind the BPF hooks.

// rig is a proxy listening on loopback that sends every connection to dst.
type rig struct {
	p     *Proxy
	addr  string
	log   *records
	stop  context.CancelFunc
	ended chan error
}

func newRig(t testing.TB, dst string, opts Options) *rig {
	t.Helper()
	target := netip.MustParseAddrPort(dst)
	opts.originalDst = func(int, netip.AddrPort) (netip.AddrPort, error) { return target, nil }
	log := &records{}
	opts.Logger = slog.New(log)
	p := New(opts)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &rig{p: p, addr: ln.Addr().String(), log: log, stop: cancel, ended: make(chan error, 1)}
	go func() { r.ended <- p.Serve(ctx, ln, Outbound) }()
	t.Cleanup(func() {
		cancel()
		<-r.ended
		p.Shutdown(0)
	})
	return r
}

// records keeps the proxy's log records for the tests to look at.
type records struct {
	mu   sync.Mutex
	list []slog.Record
}

func (r *records) Enabled(context.Context, slog.Level) bool { return true }
func (r *records) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *records) WithGroup(string) slog.Handler            { return r }
func (r *records) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.list = append(r.list, rec)
	return nil
}

// wait returns the attributes of the first record with msg, waiting for it.
func (r *records) wait(t *testing.T, msg string) map[string]slog.Value {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		r.mu.Lock()
		for _, rec := range r.list {
			if rec.Message == msg {
				attrs := map[string]slog.Value{}
				rec.Attrs(func(a slog.Attr) bool { attrs[a.Key] = a.Value; return true })
				r.mu.Unlock()
				return attrs
			}
		}
		r.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no %q log record", msg)
	return nil
}

// echoServer echoes every connection until EOF, reading slowly when pause
// is set: a peer slower than its writer.
func echoServer(t testing.TB, pause time.Duration) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 16<<10)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if _, err := c.Write(buf[:n]); err != nil {
							return
						}
					}
					if err != nil {
						return
					}
					time.Sleep(pause)
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// exchange sends size bytes through addr, half-closes, reads the echo to
// EOF and checks it.
func exchange(t testing.TB, addr string, size int) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i * 7 >> 3)
	}
	sent := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		sent <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if err := <-sent; err != nil {
		t.Fatalf("send: %v", err)
	}
	if len(got) != size || sha256.Sum256(got) != sha256.Sum256(data) {
		t.Fatalf("echo of %d bytes came back as %d bytes, intact %v", size, len(got), bytes.Equal(got, data))
	}
}

// Bytes arrive intact both ways, with a half-close passed on, and the
// connection's log record counts them.
func TestProxyMovesBytes(t *testing.T) {
	r := newRig(t, echoServer(t, 0), Options{})
	const size = 8 << 20
	exchange(t, r.addr, size)
	attrs := r.log.wait(t, "proxied")
	if attrs["sent"].Int64() != size || attrs["received"].Int64() != size || !attrs["err"].Equal(slog.AnyValue(nil)) {
		t.Errorf("proxied record %v, want %d bytes each way and no error", attrs, size)
	}
}

// offerAll offloads every connection, as far as the proxy can tell: the
// proxy then forwards the app's bytes by peek, write, read, with no kernel
// to send any straight on.
type offerAll struct{ offered, released sync.WaitGroup }

func (o *offerAll) Offload(Direction, netip.AddrPort, netip.AddrPort, netip.AddrPort, int) func() {
	o.offered.Done()
	return o.released.Done
}

// An offloaded connection whose bytes all stay with the proxy (the kernel
// sent none straight on) moves them intact, slow peer and half-close
// included, and is taken back before its sockets close.
func TestProxyOffloadedForwardsPeeked(t *testing.T) {
	o := &offerAll{}
	o.offered.Add(4)
	o.released.Add(4)
	r := newRig(t, echoServer(t, time.Millisecond), Options{BufferSize: 4 << 10, Offload: o})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() { exchange(t, r.addr, 2<<20) })
	}
	wg.Wait()
	o.offered.Wait()
	o.released.Wait()
	if attrs := r.log.wait(t, "proxied"); !attrs["offloaded"].Bool() || attrs["sent"].Int64() != 2<<20 {
		t.Errorf("proxied record %v, want offloaded and every byte through the proxy", attrs)
	}
}

// A peer slower than the other side makes the proxy hold bytes for it (its
// send buffer is full) and stop reading from the fast side meanwhile; the
// bytes still arrive intact, many connections at once.
func TestProxySlowPeer(t *testing.T) {
	r := newRig(t, echoServer(t, time.Millisecond), Options{BufferSize: 4 << 10})
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() { exchange(t, r.addr, 2<<20) })
	}
	wg.Wait()
}

// A destination that refuses ends the client's connection at once, with a
// warning naming it.
func TestProxyDialRefused(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	r := newRig(t, closed, Options{})
	c, err := net.Dial("tcp", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	var ne net.Error
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		t.Errorf("read from a connection whose destination refused: %d, %v; want it closed", n, err)
	}
	if attrs := r.log.wait(t, "dial original destination"); attrs["orig_dst"].String() != closed {
		t.Errorf("warning %v, want orig_dst %s", attrs, closed)
	}
}

// A connection with no bytes either way for the idle timeout is closed.
func TestProxyIdleTimeout(t *testing.T) {
	r := newRig(t, echoServer(t, 0), Options{IdleTimeout: 300 * time.Millisecond})
	c, err := net.Dial("tcp", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("idle connection: read %d, %v; want EOF", n, err)
	}
	if d := time.Since(start); d < 300*time.Millisecond || d > 2*time.Second {
		t.Errorf("closed after %v, want the 300ms idle timeout (swept every 250ms)", d)
	}
	if attrs := r.log.wait(t, "proxied"); attrs["err"].String() != errIdle.Error() {
		t.Errorf("proxied record %v, want err %q", attrs, errIdle)
	}
}

// Shutdown lets an open connection finish within the drain, then closes the
// ones still open.
func TestProxyShutdownDrains(t *testing.T) {
	r := newRig(t, echoServer(t, 0), Options{})
	c, err := net.Dial("tcp", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	r.stop()
	if err := <-r.ended; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	r.ended <- nil // for the cleanup
	if _, err := net.Dial("tcp", r.addr); err == nil {
		t.Error("the listener still accepts after Serve returned")
	}
	start := time.Now()
	r.p.Shutdown(200 * time.Millisecond)
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Errorf("Shutdown returned after %v with a connection open, before the drain ran out", d)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Errorf("after Shutdown: read %d, %v; want the connection closed", n, err)
	}
}

// BenchmarkProxy measures the copy loop on loopback against the same
// exchange with no proxy: 64-byte request/response on one connection, bulk
// echo, and connect-one-exchange-close.
func BenchmarkProxy(b *testing.B) {
	echo := echoServer(b, 0)
	r := newRig(b, echo, Options{})
	for _, via := range []struct{ name, addr string }{{"direct", echo}, {"proxy", r.addr}} {
		b.Run("rr64/"+via.name, func(b *testing.B) {
			c, err := net.Dial("tcp", via.addr)
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			msg := make([]byte, 64)
			b.ReportAllocs()
			for b.Loop() {
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, msg); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("bulk/"+via.name, func(b *testing.B) {
			b.SetBytes(1 << 20)
			for b.Loop() {
				exchange(b, via.addr, 1<<20)
			}
		})
		b.Run("connect/"+via.name, func(b *testing.B) {
			msg := make([]byte, 1)
			for b.Loop() {
				c, err := net.Dial("tcp", via.addr)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, msg); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
		})
	}
}
