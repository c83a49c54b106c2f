package telemetry

import (
	"encoding/json"
	"net/http"

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
	events, stop := e.Follow()
	defer stop()
	flusher, _ := w.(http.Flusher)
	enc := json.NewEncoder(w)
	w.WriteHeader(http.StatusOK)
	if flusher != nil {
		flusher.Flush()
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case f := <-events:
			if err := enc.Encode(f); err != nil {
				return
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	}
}
