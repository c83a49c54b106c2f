package webhook

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/deploy"
	"github.com/sluicemesh/sluice/inject"
	"github.com/sluicemesh/sluice/internal/admissiontest"
)

const pod = `{"apiVersion": "v1", "kind": "Pod",
  "metadata": {"generateName": "web-5d9f8b7c9-", "labels": {"app": "web", "pod-template-hash": "5d9f8b7c9"}},
  "spec": {"containers": [{"name": "web", "image": "web:1", "ports": [{"containerPort": 8080}]}]}}`

// call posts an AdmissionReview for obj to the handler and decodes the
// answer.
func call(t *testing.T, h http.Handler, operation, kind, obj string) (*response, []byte) {
	t.Helper()
	body, err := json.Marshal(review{APIVersion: reviewVersion, Kind: "AdmissionReview", Request: &request{
		UID: "705ab4f5-6393-11e8-b7cc-42010a800002", Kind: groupVersionKind{Version: "v1", Kind: kind},
		Namespace: "shop", Operation: operation, Object: json.RawMessage(obj),
	}})
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/inject", bytes.NewReader(body)))
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d: %s", rec.Code, rec.Body)
	}
	var out review
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil || out.Response == nil || out.APIVersion != reviewVersion || out.Kind != "AdmissionReview" {
		t.Fatalf("answer %s: %v", rec.Body, err)
	}
	if out.Response.UID != "705ab4f5-6393-11e8-b7cc-42010a800002" {
		t.Errorf("uid %q: want the request's", out.Response.UID)
	}
	return out.Response, rec.Body.Bytes()
}

func handler() http.Handler {
	return Handler(deploy.PodTemplate, inject.Options{CNI: true}, slog.New(slog.DiscardHandler))
}

// A Pod CREATE is allowed with a JSON patch that, applied, gives a pod the
// API server accepts with Sluice's sidecar first.
func TestInjectsCreatedPod(t *testing.T) {
	resp, raw := call(t, handler(), "CREATE", "Pod", pod)
	if !resp.Allowed || resp.PatchType != "JSONPatch" || len(resp.Patch) == 0 {
		t.Fatalf("answer %s: want allowed with a JSONPatch", raw)
	}
	got := admissiontest.StrictPod(t, admissiontest.ApplyPatch(t, []byte(pod), resp.Patch))
	if len(got.Spec.InitContainers) != 1 || got.Spec.InitContainers[0].Name != inject.SidecarContainer || got.Annotations["sluice.dev/workload"] != "web" {
		t.Errorf("injected pod: init containers %v, annotations %v", got.Spec.InitContainers, got.Annotations)
	}
}

// Whatever is no Pod CREATE is allowed as it is, as is a pod inject
// leaves alone, which is told why.
func TestAllowsTheRest(t *testing.T) {
	h := handler()
	for _, c := range []struct{ operation, kind, obj, warning string }{
		{"UPDATE", "Pod", pod, ""},
		{"CREATE", "ConfigMap", `{"metadata": {"name": "c"}}`, ""},
		{"CREATE", "Pod", `{"metadata": {"name": "p"}, "spec": {"hostNetwork": true, "containers": [{"name": "a", "image": "a"}]}}`, "hostNetwork: true"},
	} {
		resp, raw := call(t, h, c.operation, c.kind, c.obj)
		if !resp.Allowed || resp.Patch != nil || resp.PatchType != "" || resp.Status != nil {
			t.Errorf("%s %s: answer %s, want allowed, no patch", c.operation, c.kind, raw)
		}
		if c.warning != "" && (len(resp.Warnings) != 1 || !strings.Contains(resp.Warnings[0], c.warning)) {
			t.Errorf("%s %s: warnings %q, want one saying %q", c.operation, c.kind, resp.Warnings, c.warning)
		}
	}
}

// A pod inject refuses is not admitted: it would run uncaptured in a
// namespace that asked for capture. The message names the problem and
// the fixes.
func TestRefusesPodInjectRefuses(t *testing.T) {
	clash := `{"metadata": {"generateName": "db-"}, "spec": {"containers": [{"name": "a", "image": "a"}], "volumes": [{"name": "podinfo", "emptyDir": {}}]}}`
	h := Handler(deploy.PodTemplate, inject.Options{}, slog.New(slog.DiscardHandler))
	resp, raw := call(t, h, "CREATE", "Pod", clash)
	if resp.Allowed || resp.Patch != nil || resp.Status == nil || resp.Status.Code != http.StatusForbidden {
		t.Fatalf("answer %s: want refused", raw)
	}
	for _, want := range []string{"pod shop/db-", "volume named podinfo", "rename it", `sluice.dev/inject: "false"`} {
		if !strings.Contains(resp.Status.Message, want) {
			t.Errorf("message %q does not say %q", resp.Status.Message, want)
		}
	}
	misspelt := `{"metadata": {"generateName": "db-", "annotations": {"sluice.dev/offload-port": "5432"}}, "spec": {"containers": [{"name": "a", "image": "a"}]}}`
	if resp, raw := call(t, h, "CREATE", "Pod", misspelt); resp.Allowed || resp.Status == nil ||
		!strings.Contains(resp.Status.Message, "unknown annotation sluice.dev/offload-port") || !strings.Contains(resp.Status.Message, "fix the pod's annotation") {
		t.Errorf("a misspelt annotation: answer %s; want refused, naming it", raw)
	}
}

// What is no v1 AdmissionReview gets 400 and one line saying so; /healthz
// answers ok.
func TestBadRequests(t *testing.T) {
	h := handler()
	for body, want := range map[string]string{
		"garbage": "the body is not an AdmissionReview",
		`{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "u"}}`: "want an admission.k8s.io/v1 AdmissionReview",
		`{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}`:                               "with a request",
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("POST", "/inject", strings.NewReader(body)))
		if msg := rec.Body.String(); rec.Code != http.StatusBadRequest || strings.Count(msg, "\n") != 1 || !strings.Contains(msg, want) {
			t.Errorf("%s: status %d, %q: want 400 and one line saying %q", body, rec.Code, msg, want)
		}
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
	if rec.Code != http.StatusOK || rec.Body.String() != "ok\n" {
		t.Errorf("/healthz: %d %q", rec.Code, rec.Body)
	}
}

// The serving certificate verifies against the CA for every name the API
// server may call the Service by.
func TestGenerateCerts(t *testing.T) {
	caPEM, certPEM, keyPEM, err := GenerateCerts("sluice-webhook", "sluice-system", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		t.Errorf("key pair: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatal("the CA is no PEM certificate")
	}
	block, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"sluice-webhook", "sluice-webhook.sluice-system", "sluice-webhook.sluice-system.svc", "sluice-webhook.sluice-system.svc.cluster.local"} {
		if _, err := cert.Verify(x509.VerifyOptions{DNSName: name, Roots: roots}); err != nil {
			t.Errorf("verify for %s: %v", name, err)
		}
	}
	if _, err := cert.Verify(x509.VerifyOptions{DNSName: "other.sluice-system.svc", Roots: roots}); err == nil {
		t.Error("verifies for another Service's name")
	}
	if _, _, _, err := GenerateCerts("s", "n", 0); err == nil {
		t.Error("0 validity accepted")
	}
}

// writeCerts writes a fresh key pair for sluice-webhook.sluice-system into
// dir, dated at, and returns its CA.
func writeCerts(t *testing.T, dir string, at time.Time) *x509.CertPool {
	t.Helper()
	caPEM, certPEM, keyPEM, err := GenerateCerts("sluice-webhook", "sluice-system", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{"tls.crt": certPEM, "tls.key": keyPEM} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		// A time of the test's choosing: two writes within the file
		// system's time granularity would look like none.
		if err := os.Chtimes(path, at, at); err != nil {
			t.Fatal(err)
		}
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	return roots
}

// Serve answers over TLS with the key pair in its files, picks up a new
// one written over them without a restart, and returns nil once its
// context is done.
func TestServeTLS(t *testing.T) {
	dir := t.TempDir()
	crt, key := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	firstCA := writeCerts(t, dir, time.Now().Add(-time.Minute))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- ServeListener(ctx, ln, crt, key, handler(), slog.New(slog.DiscardHandler)) }()

	healthz := func(roots *x509.CertPool) error {
		client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			TLSClientConfig:   &tls.Config{RootCAs: roots, ServerName: "sluice-webhook.sluice-system.svc"},
			DisableKeepAlives: true,
		}}
		resp, err := client.Get("https://" + ln.Addr().String() + "/healthz")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK || string(body) != "ok\n" {
			return errors.Join(err, errors.New(resp.Status+" "+string(body)))
		}
		return nil
	}
	if err := healthz(firstCA); err != nil {
		t.Fatalf("/healthz: %v", err)
	}
	secondCA := writeCerts(t, dir, time.Now())
	if err := healthz(secondCA); err != nil {
		t.Errorf("/healthz with the renewed certificate: %v", err)
	}
	if err := healthz(firstCA); err == nil {
		t.Error("the old certificate still serves")
	}

	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("serve did not return once its context was done")
	}
}

// A webhook whose key pair is missing does not start.
func TestServeWithoutKeyPair(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	err = ServeListener(context.Background(), ln, filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), handler(), slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "tls.crt") {
		t.Errorf("serve without a key pair: %v", err)
	}
}
