package telemetry

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// AddrError is a sidecar address no request can be made to (a typo, not a
// sidecar that is down).
type AddrError struct {
	Addr string
	Err  error // why, without the path of the request net/url would quote
}

func (e *AddrError) Error() string { return fmt.Sprintf("address %q: %v", e.Addr, e.Err) }
func (e *AddrError) Unwrap() error { return e.Err }

// get asks the sidecar at addr (a URL without the path) for path; doing
// says what for when the sidecar cannot be reached.
func get(ctx context.Context, addr, path, doing string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, addr+path, nil)
	if err != nil {
		if ue := new(url.Error); errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, &AddrError{addr, err}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s (is 'sluice run --cgroup' running there? see --addr): %w", doing, err)
	}
	return resp, nil
}

// FetchFlows asks the sidecar whose Handler is at addr for its open flows.
func FetchFlows(ctx context.Context, addr string) ([]Flow, error) {
	resp, err := get(ctx, addr, "/flows", "ask the sidecar at "+addr+" for its flows")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("the sidecar at %s answered %s: is it a Sluice sidecar started with --cgroup?", addr, resp.Status)
	}
	var flows []Flow
	if err := json.NewDecoder(resp.Body).Decode(&flows); err != nil {
		return nil, fmt.Errorf("read flows from %s: %w", addr, err)
	}
	return flows, nil
}

// FlowStream is the flows a sidecar sends as they open, close or fail,
// one JSON object a line.
type FlowStream struct {
	ctx  context.Context
	addr string
	body io.ReadCloser
	sc   *bufio.Scanner
}

// FollowFlows starts following the flows of the sidecar whose Handler is
// at addr, until ctx ends or the sidecar ends the stream. Close it.
func FollowFlows(ctx context.Context, addr string) (*FlowStream, error) {
	resp, err := get(ctx, addr, "/flows?follow=true", "follow the sidecar's flows at "+addr)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("follow the sidecar's flows at %s: %s: %s", addr, resp.Status, strings.TrimSpace(string(body)))
	}
	return &FlowStream{ctx: ctx, addr: addr, body: resp.Body, sc: bufio.NewScanner(resp.Body)}, nil
}

// Next waits for the next flow event; false at the stream's end (see Err).
func (s *FlowStream) Next() bool { return s.sc.Scan() }

// Bytes is the event Next found, as the sidecar sent it (one JSON object).
func (s *FlowStream) Bytes() []byte { return s.sc.Bytes() }

// Flow is the event Next found.
func (s *FlowStream) Flow() (Flow, error) {
	var f Flow
	if err := json.Unmarshal(s.sc.Bytes(), &f); err != nil {
		return Flow{}, fmt.Errorf("read flow from %s: %w", s.addr, err)
	}
	return f, nil
}

// Err says why the stream ended: nil when ctx did.
func (s *FlowStream) Err() error {
	if s.ctx.Err() != nil {
		return nil
	}
	if err := s.sc.Err(); err != nil {
		return fmt.Errorf("follow the sidecar's flows at %s: %w", s.addr, err)
	}
	return fmt.Errorf("the sidecar at %s ended the flows stream: it stopped, or dropped this follower for reading too slowly", s.addr)
}

// Close ends the stream.
func (s *FlowStream) Close() error { return s.body.Close() }
