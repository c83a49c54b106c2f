package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// webhook certs prints a Secret and a MutatingWebhookConfiguration that
// decode strictly, for the Service the flags name, and the configuration's
// caBundle verifies the Secret's certificate for that Service.
// certsOutput runs sluice webhook certs with args and decodes its two
// objects strictly.
func certsOutput(t *testing.T, args ...string) (corev1.Secret, admissionv1.MutatingWebhookConfiguration) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	if code := run(append([]string{"webhook", "certs"}, args...), &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	docs := strings.Split(stdout.String(), "\n---\n")
	if len(docs) != 2 {
		t.Fatalf("%d documents, want 2:\n%s", len(docs), stdout.String())
	}
	var secret corev1.Secret
	if err := yaml.UnmarshalStrict([]byte(docs[0]), &secret); err != nil {
		t.Fatalf("the Secret: %v\n%s", err, docs[0])
	}
	var config admissionv1.MutatingWebhookConfiguration
	if err := yaml.UnmarshalStrict([]byte(docs[1]), &config); err != nil {
		t.Fatalf("the MutatingWebhookConfiguration: %v\n%s", err, docs[1])
	}
	return secret, config
}

// verifies tells whether the Secret's certificate verifies against the
// configuration's caBundle for dnsName.
func verifies(t *testing.T, secret corev1.Secret, config admissionv1.MutatingWebhookConfiguration, dnsName string) error {
	t.Helper()
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(config.Webhooks[0].ClientConfig.CABundle) {
		t.Fatalf("caBundle %q is no PEM certificate", config.Webhooks[0].ClientConfig.CABundle)
	}
	block, _ := pem.Decode(secret.Data["tls.crt"])
	if block == nil {
		t.Fatalf("tls.crt %q is no PEM", secret.Data["tls.crt"])
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	_, err = cert.Verify(x509.VerifyOptions{DNSName: dnsName, Roots: roots})
	return err
}

// Renewed with --also-trust the CA in force, the configuration trusts the
// old key pair (the webhook's pods serve it until their Secret is updated)
// and the new one; without, only the new one. A file that is no PEM
// certificate is refused in one line.
func TestWebhookCertsRenewal(t *testing.T) {
	oldSecret, oldConfig := certsOutput(t)
	inForce := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(inForce, oldConfig.Webhooks[0].ClientConfig.CABundle, 0o600); err != nil {
		t.Fatal(err)
	}
	secret, config := certsOutput(t, "--also-trust", inForce)
	const name = "sluice-webhook.sluice-system.svc"
	if err := verifies(t, oldSecret, config, name); err != nil {
		t.Errorf("renewed with --also-trust, the old key pair is not trusted: %v", err)
	}
	if err := verifies(t, secret, config, name); err != nil {
		t.Errorf("renewed, the new key pair is not trusted: %v", err)
	}
	if _, plain := certsOutput(t); verifies(t, oldSecret, plain, name) == nil {
		t.Error("without --also-trust the old key pair is trusted: the test cannot tell")
	}
	bad := filepath.Join(t.TempDir(), "bad.pem")
	os.WriteFile(bad, []byte("not a certificate"), 0o600)
	var stdout, stderr bytes.Buffer
	if code := run([]string{"webhook", "certs", "--also-trust", bad}, &stdout, &stderr); code != 2 || stdout.Len() != 0 ||
		strings.Count(strings.TrimSpace(stderr.String()), "\n") != 0 || !strings.Contains(stderr.String(), "--also-trust") {
		t.Errorf("--also-trust of no certificate: exit %d, stdout %d bytes, stderr %q; want 2, nothing, one line", code, stdout.Len(), stderr.String())
	}
}

func TestWebhookCerts(t *testing.T) {
	secret, config := certsOutput(t, "--namespace", "mesh", "--service", "injector")
	if secret.Name != "sluice-webhook-tls" || secret.Namespace != "mesh" || secret.Type != corev1.SecretTypeTLS || config.Name != "sluice-inject" || len(config.Webhooks) != 1 {
		t.Fatalf("Secret %s/%s (%s), configuration %s with %d webhooks", secret.Namespace, secret.Name, secret.Type, config.Name, len(config.Webhooks))
	}
	wh := config.Webhooks[0]
	if svc := wh.ClientConfig.Service; svc == nil || svc.Name != "injector" || svc.Namespace != "mesh" || svc.Path == nil || *svc.Path != "/inject" {
		t.Errorf("clientConfig.service %+v: want injector in mesh, /inject", svc)
	}
	if _, err := tls.X509KeyPair(secret.Data["tls.crt"], secret.Data["tls.key"]); err != nil {
		t.Errorf("the Secret's key pair: %v", err)
	}
	if err := verifies(t, secret, config, "injector.mesh.svc"); err != nil {
		t.Errorf("the certificate does not verify against caBundle for injector.mesh.svc: %v", err)
	}
	if wh.FailurePolicy == nil || *wh.FailurePolicy != admissionv1.Fail || wh.NamespaceSelector.MatchLabels["sluice.dev/inject"] != "enabled" {
		t.Errorf("failurePolicy %v, namespaceSelector %v", wh.FailurePolicy, wh.NamespaceSelector)
	}
}
