// Package kubetest helps tests talk to a fake API server.
package kubetest

import (
	"encoding/pem"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
)

// Token is the bearer token Kubeconfig's user sends.
const Token = "sesame"

// Kubeconfig writes a kubeconfig for srv (an httptest TLS server), trusting
// its certificate, with the user's token Token, and returns its path.
func Kubeconfig(t testing.TB, srv *httptest.Server) string {
	t.Helper()
	dir := t.TempDir()
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), ca, 0o600); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "config")
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
current-context: test
contexts:
- name: test
  context: {cluster: c, user: u}
clusters:
- name: c
  cluster: {server: %q, certificate-authority: ca.crt}
users:
- name: u
  user: {token: %s}
`, srv.URL, Token)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
