// Package webhook is Sluice's mutating admission webhook: it serves
// Kubernetes' AdmissionReview v1 over HTTPS and answers each Pod CREATE
// with the JSON patch that adds Sluice to the pod (inject.Pod).
package webhook

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strings"

	"github.com/sluicemesh/sluice/inject"
)

// The admission.k8s.io/v1 AdmissionReview, with only the fields the
// webhook reads or writes: k8s.io/api's types would bring most of the
// Kubernetes client libraries into the binary.
type (
	review struct {
		APIVersion string    `json:"apiVersion"`
		Kind       string    `json:"kind"`
		Request    *request  `json:"request,omitempty"`
		Response   *response `json:"response,omitempty"`
	}
	request struct {
		UID       string           `json:"uid"`
		Kind      groupVersionKind `json:"kind"`
		Namespace string           `json:"namespace,omitempty"`
		Operation string           `json:"operation"`
		Object    json.RawMessage  `json:"object,omitempty"`
	}
	groupVersionKind struct {
		Group   string `json:"group"`
		Version string `json:"version"`
		Kind    string `json:"kind"`
	}
	response struct {
		UID       string   `json:"uid"`
		Allowed   bool     `json:"allowed"`
		PatchType string   `json:"patchType,omitempty"`
		Patch     []byte   `json:"patch,omitempty"` // base64 in JSON, as the API server wants
		Warnings  []string `json:"warnings,omitempty"`
		Status    *status  `json:"status,omitempty"`
	}
	status struct {
		Message string `json:"message,omitempty"`
		Code    int32  `json:"code,omitempty"`
	}
)

const reviewVersion = "admission.k8s.io/v1"

// maxReview bounds a request's body: the API server's own limit on an
// object is 3 MiB, and a review holds one (two for an UPDATE).
const maxReview = 8 << 20

// Handler serves POST /inject, the admission reviews, and GET /healthz.
// Sluice goes into every Pod created, per the template (deploy.PodTemplate)
// and opts; every other object and operation is allowed as it is.
func Handler(template []byte, opts inject.Options, log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("POST /inject", func(w http.ResponseWriter, req *http.Request) {
		var rv review
		dec := json.NewDecoder(http.MaxBytesReader(w, req.Body, maxReview))
		if err := dec.Decode(&rv); err != nil {
			http.Error(w, oneLine(fmt.Sprintf("the body is not an AdmissionReview: %v", err)), http.StatusBadRequest)
			return
		}
		if rv.APIVersion != reviewVersion || rv.Kind != "AdmissionReview" || rv.Request == nil {
			http.Error(w, fmt.Sprintf("want an %s AdmissionReview with a request: list only %q in the webhook's admissionReviewVersions",
				reviewVersion, "v1"), http.StatusBadRequest)
			return
		}
		out := review{APIVersion: reviewVersion, Kind: "AdmissionReview", Response: admit(rv.Request, template, opts, log)}
		w.Header().Set("Content-Type", "application/json")
		if err := json.NewEncoder(w).Encode(out); err != nil {
			log.Warn("admission answer not sent", "uid", rv.Request.UID, "error", err)
		}
	})
	return mux
}

// admit decides on one request. A pod is allowed unless inject refuses it:
// one that asked for capture (its namespace did) must not start without.
func admit(req *request, template []byte, opts inject.Options, log *slog.Logger) *response {
	resp := &response{UID: req.UID, Allowed: true}
	if req.Kind != (groupVersionKind{Version: "v1", Kind: "Pod"}) || req.Operation != "CREATE" {
		log.Info("allowed unchanged", "namespace", req.Namespace, "kind", req.Kind.Kind, "operation", req.Operation)
		return resp
	}
	patch, r, err := inject.Pod(req.Object, req.Namespace, template, opts)
	switch {
	case err != nil:
		log.Warn("pod refused", "namespace", req.Namespace, "pod", r.Name, "error", err)
		resp.Allowed = false
		resp.Status = &status{Code: http.StatusForbidden, Message: oneLine(fmt.Sprintf(
			"sluice: %v (or, to run the pod uncaptured, annotate it sluice.dev/inject: \"false\")", err))}
	case r.Injected:
		log.Info("pod injected", "namespace", req.Namespace, "pod", r.Name, "cni", opts.CNI)
		resp.PatchType, resp.Patch = "JSONPatch", patch
	default:
		log.Info("pod left as it is", "namespace", req.Namespace, "pod", r.Name, "reason", r.Skipped)
		// Said to whoever creates the pod: in a namespace asking for
		// capture, this one runs without Sluice's sidecar.
		resp.Warnings = []string{"sluice did not inject this pod: " + r.Skipped}
	}
	return resp
}

// oneLine keeps a message to one line, as kubectl prints it.
func oneLine(s string) string {
	return strings.ReplaceAll(strings.TrimSpace(s), "\n", "; ")
}
