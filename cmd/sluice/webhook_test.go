package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// webhook certs prints a Secret and a MutatingWebhookConfiguration that
// decode strictly, for the Service the flags name, and the configuration's
// caBundle verifies the Secret's certificate for that Service.
func TestWebhookCerts(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"webhook", "certs", "--namespace", "mesh", "--service", "injector"}, &stdout, &stderr); code != 0 {
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
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(wh.ClientConfig.CABundle) {
		t.Fatalf("caBundle %q is no PEM certificate", wh.ClientConfig.CABundle)
	}
	block, _ := pem.Decode(secret.Data["tls.crt"])
	if block == nil {
		t.Fatalf("tls.crt %q is no PEM", secret.Data["tls.crt"])
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{DNSName: "injector.mesh.svc", Roots: roots}); err != nil {
		t.Errorf("the certificate does not verify against caBundle for injector.mesh.svc: %v", err)
	}
	if wh.FailurePolicy == nil || *wh.FailurePolicy != admissionv1.Fail || wh.NamespaceSelector.MatchLabels["sluice.dev/inject"] != "enabled" {
		t.Errorf("failurePolicy %v, namespaceSelector %v", wh.FailurePolicy, wh.NamespaceSelector)
	}
}
