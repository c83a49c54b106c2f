// Package dnsfwd is the sidecar's DNS forwarder: the port DNS capture sends
// a pod's queries to (15053, Istio's). It passes each query, UDP or TCP, to
// the nameserver the app sent it to (the kernel keeps it: SO_ORIGINAL_DST)
// as it came, and the answer back as it came, counting queries and errors;
// a query the kernel has no record of (one sent to the forwarder itself)
// goes to the pod's nameservers. It keeps no cache and reads no record:
// what it adds is a place where a pod's DNS is seen, and one a mesh's DNS
// proxy can take.
package dnsfwd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Error reasons, as counted.
const (
	ReasonTimeout   = "timeout"   // no nameserver answered in time
	ReasonUpstream  = "upstream"  // every nameserver refused or failed
	ReasonMalformed = "malformed" // no DNS message: shorter than a header, or a TCP length that lies
)

// maxMessage is the largest DNS message: TCP's 16-bit length, and the
// most an EDNS UDP answer may be.
const maxMessage = 65535

// Forwarder forwards each query to the nameserver it was sent to, else to
// Upstreams, trying each in turn.
type Forwarder struct {
	Upstreams []netip.AddrPort
	Timeout   time.Duration // per nameserver tried; 0: 2 s
	Logger    *slog.Logger
	// UDPOrigin and TCPOrigin name the nameserver a UDP query from a
	// source, or a TCP connection's queries, were sent to; an error when
	// there is none to name. New sets the kernel's.
	UDPOrigin func(source netip.AddrPort) (netip.AddrPort, error)
	TCPOrigin func(c net.Conn) (netip.AddrPort, error)

	queries  *prometheus.CounterVec
	errors   *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

// New is a forwarder to upstreams; its metrics are Collectors'.
func New(upstreams []netip.AddrPort, log *slog.Logger) *Forwarder {
	f := &Forwarder{Upstreams: upstreams, Timeout: 2 * time.Second, Logger: log, UDPOrigin: udpOrigin, TCPOrigin: tcpOrigin,
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_dns_queries_total", Help: "DNS queries the sidecar's forwarder took, by protocol (udp, tcp).",
		}, []string{"protocol"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_dns_errors_total", Help: "DNS queries the forwarder could not answer, by protocol and reason (timeout, upstream, malformed).",
		}, []string{"protocol", "reason"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "sluice_dns_upstream_duration_seconds", Help: "Time from a query to its nameserver's answer, by protocol.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"protocol"}),
	}
	if f.Logger == nil {
		f.Logger = slog.Default()
	}
	return f
}

// Collectors are the forwarder's metrics, for a registry.
func (f *Forwarder) Collectors() []prometheus.Collector {
	return []prometheus.Collector{f.queries, f.errors, f.duration}
}

// Nameservers reads the nameserver lines of a resolv.conf: where the pod's
// queries go, port 53.
func Nameservers(path string) ([]netip.AddrPort, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	var out []netip.AddrPort
	sc := bufio.NewScanner(file)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		if a, err := netip.ParseAddr(fields[1]); err == nil {
			out = append(out, netip.AddrPortFrom(a.Unmap(), 53))
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s names no nameserver", path)
	}
	return out, nil
}

// ServeUDP answers the queries that come to conn until ctx ends, each in
// its own goroutine.
func (f *Forwarder) ServeUDP(ctx context.Context, conn *net.UDPConn) error {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	buf := make([]byte, maxMessage)
	for {
		n, from, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("dns: read a query: %w", err)
		}
		f.queries.WithLabelValues("udp").Inc()
		query := append([]byte(nil), buf[:n]...)
		go func() {
			answer, reason := f.exchange(ctx, "udp", query, origin(f.UDPOrigin, from))
			if reason != "" {
				f.errors.WithLabelValues("udp", reason).Inc()
				if answer = servfail(query); answer == nil {
					return
				}
			}
			if _, err := conn.WriteToUDPAddrPort(answer, from); err != nil && ctx.Err() == nil {
				f.Logger.Debug("dns: answer not sent", "to", from, "err", err)
			}
		}()
	}
}

// ServeTCP answers the queries of every connection to ln until ctx ends:
// length-prefixed messages, several on one connection, answered in turn.
func (f *Forwarder) ServeTCP(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("dns: accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			stop := context.AfterFunc(ctx, func() { c.Close() })
			defer stop()
			f.serveConn(ctx, c)
		}()
	}
}

func (f *Forwarder) serveConn(ctx context.Context, c net.Conn) {
	asked := origin(f.TCPOrigin, c)
	r := bufio.NewReader(c)
	for {
		c.SetReadDeadline(time.Now().Add(30 * time.Second)) // an idle client's connection ends
		query, err := readTCP(r)
		if errors.Is(err, io.EOF) || errors.Is(err, os.ErrDeadlineExceeded) {
			return
		}
		f.queries.WithLabelValues("tcp").Inc()
		if err != nil {
			f.errors.WithLabelValues("tcp", ReasonMalformed).Inc()
			return
		}
		answer, reason := f.exchange(ctx, "tcp", query, asked)
		if reason != "" {
			f.errors.WithLabelValues("tcp", reason).Inc()
			if answer = servfail(query); answer == nil {
				return
			}
		}
		if err := writeTCP(c, answer); err != nil {
			return
		}
	}
}

// origin is the nameserver lookup names for key: nil when it names none. DNS
// capture takes port 53 only: another port named (a connection made to the
// forwarder itself, which inbound capture may answer with the forwarder's
// own address) is no nameserver asked.
func origin[K any](lookup func(K) (netip.AddrPort, error), key K) []netip.AddrPort {
	if lookup == nil {
		return nil
	}
	asked, err := lookup(key)
	if err != nil || asked.Port() != 53 {
		return nil
	}
	return []netip.AddrPort{netip.AddrPortFrom(asked.Addr().Unmap(), asked.Port())}
}

// exchange asks the nameserver the query was sent to (asked) or, with none,
// the upstreams in turn, over proto, until one answers; the answer, or why
// there is none. Only the nameserver asked is asked: the app moves on to
// its next one itself.
func (f *Forwarder) exchange(ctx context.Context, proto string, query []byte, asked []netip.AddrPort) ([]byte, string) {
	if len(query) < 12 {
		return nil, ReasonMalformed
	}
	reason := ReasonUpstream
	upstreams := asked
	if len(asked) == 0 {
		upstreams = f.Upstreams
	}
	for _, up := range upstreams {
		start := time.Now()
		answer, err := f.ask(ctx, proto, up, query)
		if err == nil {
			f.duration.WithLabelValues(proto).Observe(time.Since(start).Seconds())
			return answer, ""
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			reason = ReasonTimeout
		}
		f.Logger.Debug("dns: nameserver did not answer", "nameserver", up, "protocol", proto, "err", err)
	}
	return nil, reason
}

// ask sends query to one nameserver and returns its answer to it (same ID).
func (f *Forwarder) ask(ctx context.Context, proto string, up netip.AddrPort, query []byte) ([]byte, error) {
	timeout := f.Timeout
	if timeout == 0 {
		timeout = 2 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, proto, up.String())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	deadline, _ := ctx.Deadline()
	c.SetDeadline(deadline)
	if proto == "tcp" {
		if err := writeTCP(c, query); err != nil {
			return nil, err
		}
		return readTCP(bufio.NewReader(c))
	}
	if _, err := c.Write(query); err != nil {
		return nil, err
	}
	buf := make([]byte, maxMessage)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return nil, err
		}
		// A datagram that is not the answer to this query (a late one
		// to an earlier query on a reused port) is skipped.
		if n >= 12 && buf[0] == query[0] && buf[1] == query[1] {
			return append([]byte(nil), buf[:n]...), nil
		}
	}
}

// servfail is the answer to query that says the server failed (RCODE 2),
// the question echoed; nil when query is no DNS message.
func servfail(query []byte) []byte {
	if len(query) < 12 {
		return nil
	}
	out := append([]byte(nil), query...)
	out[2] = out[2]&0x79 | 0x80 // QR set; opcode and RD kept; AA and TC cleared
	out[3] = out[3]&0x70 | 0x80 | 2
	return out
}

func readTCP(r *bufio.Reader) ([]byte, error) {
	var n uint16
	if err := binary.Read(r, binary.BigEndian, &n); err != nil {
		return nil, err
	}
	msg := make([]byte, n)
	if _, err := io.ReadFull(r, msg); err != nil {
		return nil, fmt.Errorf("a %d-byte message cut short: %w", n, err)
	}
	if n < 12 {
		return nil, fmt.Errorf("a %d-byte message: no DNS header", n)
	}
	return msg, nil
}

func writeTCP(w io.Writer, msg []byte) error {
	buf := make([]byte, 2+len(msg))
	binary.BigEndian.PutUint16(buf, uint16(len(msg)))
	copy(buf[2:], msg)
	_, err := w.Write(buf)
	return err
}
