package dashboard

import (
	"bytes"
	"os"
	"testing"
)

// The committed dashboard is exactly what the Go code builds: edit the Go,
// then run `go generate ./telemetry/dashboard` (make generate).
func TestCommittedDashboardIsGenerated(t *testing.T) {
	want, err := JSON()
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile("../../deploy/grafana/sluice.json")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Error("deploy/grafana/sluice.json differs from what telemetry/dashboard builds: run 'make generate' and commit it")
	}
}
