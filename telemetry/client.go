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

// AddrError is an agent address no request can be made to (a typo, not an
// agent that is down).
type AddrError struct {
	Addr string
	Err  error // why, without the path of the request net/url would quote
}

func (e *AddrError) Error() string { return fmt.Sprintf("address %q: %v", e.Addr, e.Err) }
func (e *AddrError) Unwrap() error { return e.Err }

// get asks the agent at addr (a URL without the path) for path; doing
// says what for when the agent cannot be reached.
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
		return nil, fmt.Errorf("%s (is 'sluice agent' running there? see --addr): %w", doing, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("%s: %s: %s", doing, resp.Status, strings.TrimSpace(string(body)))
	}
	return resp, nil
}

// flowsPath is the agent's path of pod's flows (any pod: the node's only).
func flowsPath(pod string, follow bool) string {
	q := url.Values{}
	if pod != "" {
		q.Set("pod", pod)
	}
	if follow {
		q.Set("follow", "true")
	}
	if len(q) == 0 {
		return "/flows"
	}
	return "/flows?" + q.Encode()
}

// FetchFlows asks the agent at addr for pod's open flows (pod: its
// Kubernetes uid, cgroup path or cgroup id; empty on a node of one pod).
func FetchFlows(ctx context.Context, addr, pod string) ([]Flow, error) {
	resp, err := get(ctx, addr, flowsPath(pod, false), "ask the agent at "+addr+" for the pod's flows")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var flows []Flow
	if err := json.NewDecoder(resp.Body).Decode(&flows); err != nil {
		return nil, fmt.Errorf("read flows from %s: %w", addr, err)
	}
	return flows, nil
}

// FlowStream is the flows the agent sends as they open, close or fail,
// one JSON object a line.
type FlowStream struct {
	ctx  context.Context
	addr string
	body io.ReadCloser
	sc   *bufio.Scanner
}

// FollowFlows starts following pod's flows at the agent at addr, until ctx
// ends or the agent ends the stream. Close it.
func FollowFlows(ctx context.Context, addr, pod string) (*FlowStream, error) {
	resp, err := get(ctx, addr, flowsPath(pod, true), "follow the pod's flows at the agent at "+addr)
	if err != nil {
		return nil, err
	}
	return &FlowStream{ctx: ctx, addr: addr, body: resp.Body, sc: bufio.NewScanner(resp.Body)}, nil
}

// Next waits for the next flow event; false at the stream's end (see Err).
func (s *FlowStream) Next() bool { return s.sc.Scan() }

// Bytes is the event Next found, as the agent sent it (one JSON object).
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
		return fmt.Errorf("follow the pod's flows at %s: %w", s.addr, err)
	}
	return fmt.Errorf("the agent at %s ended the flows stream: it stopped, the pod went, or it dropped this follower for reading too slowly", s.addr)
}

// Close ends the stream.
func (s *FlowStream) Close() error { return s.body.Close() }
