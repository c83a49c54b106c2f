package telemetry

import (
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Handler serves the exporter:
//
//	/metrics            Prometheus text format
//	/flows              the open flows, as a JSON array
//	/flows?follow=true  every flow event from now on, one JSON object a line
func (e *Exporter) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(e.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	mux.HandleFunc("/flows", e.serveFlows)
	return mux
}

func (e *Exporter) serveFlows(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	if r.URL.Query().Get("follow") != "true" {
		flows, err := e.Live()
		if err != nil {
			e.opts.Logger.Warn("read live sockets", "err", err)
		}
		json.NewEncoder(w).Encode(flows)
		return
	}
	f, err := e.Follow()
	if errors.Is(err, ErrStopped) {
		http.Error(w, err.Error()+": the pod went", http.StatusGone)
		return
	}
	if err != nil {
		w.Header().Set("Retry-After", "10")
		http.Error(w, err.Error()+": try again later", http.StatusServiceUnavailable)
		return
	}
	defer f.Stop()
	e.stream(w, r, f)
}

// stream writes f's events to w until the client goes, or f is evicted. A
// write may block for the follower timeout at most: a client that stops
// reading fills the socket, then is dropped, and its memory freed.
func (e *Exporter) stream(w http.ResponseWriter, r *http.Request, f *Follower) {
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	write := func(v any) error {
		rc.SetWriteDeadline(time.Now().Add(e.opts.FollowerTimeout))
		if v != nil {
			if err := enc.Encode(v); err != nil {
				return err
			}
		}
		return rc.Flush()
	}
	w.WriteHeader(http.StatusOK)
	err := write(nil)
	for err == nil {
		select {
		case <-r.Context().Done():
			return
		case <-f.Evicted():
			return
		case fl := <-f.Events():
			err = write(fl)
		}
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		f.Evict()
	}
}
