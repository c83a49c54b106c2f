package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/sluicemesh/sluice/deploy"
	"github.com/sluicemesh/sluice/inject"
	"github.com/sluicemesh/sluice/webhook"
)

const webhookHelp = `Usage: sluice webhook [--addr :9443] [--tls-dir /tls] [--cni] [--image IMAGE]
       sluice webhook certs [--namespace sluice-system] [--service sluice-webhook] [--valid-for 8760h] [--also-trust FILE]

The injector: a mutating admission webhook that adds Sluice to every pod
created in a namespace labelled sluice.dev/inject=enabled, as 'sluice
inject' adds it to manifests (--cni and --image as there). It leaves a pod
annotated sluice.dev/inject: "false", on the host's network or already
injected as it is (with a warning to whoever creates it), and refuses one
it cannot inject (a volume of one of Sluice's names, a sluice.dev/
annotation the install would refuse), naming the problem, rather than let
it run uncaptured or fail its sandbox on every try. It serves HTTPS on
--addr with tls.crt and tls.key from --tls-dir (a kubernetes.io/tls Secret
mounted there), read again when the Secret changes; GET /healthz answers
ok. deploy/webhook/ runs it.

certs prints what the webhook needs for kubectl apply: the Secret
sluice-webhook-tls (a new serving key pair for the Service --service in
--namespace, signed by a new CA) and the MutatingWebhookConfiguration
sluice-inject of deploy/webhook/, which trusts that CA. Run it again to
renew both, with --also-trust naming the CA in force: the API server then
trusts the old CA and the new one, so the webhook's pods serve on with
the old key pair until the kubelet updates their Secret (a minute or so).
Without it, pods created in labelled namespaces meanwhile are refused.

Examples:
  kubectl apply -k deploy/cni/
  sluice webhook certs | kubectl apply -f -
  kubectl label namespace shop sluice.dev/inject=enabled
  sluice webhook --addr :9443 --tls-dir /tls --cni

Renewal:
  kubectl get mutatingwebhookconfiguration sluice-inject \
    -o jsonpath='{.webhooks[0].clientConfig.caBundle}' | base64 -d > ca-in-force.pem
  sluice webhook certs --also-trust ca-in-force.pem | kubectl apply -f -`

func webhookCommand() command {
	c := command{
		name:    "webhook",
		summary: "admission webhook: add Sluice to pods created in labelled namespaces (certs: its TLS)",
		help:    webhookHelp,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		if len(args) > 0 && args[0] == "certs" {
			return webhookCerts(c, args[1:], stdout)
		} else if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
			return usageError{fmt.Sprintf("unknown webhook subcommand %q: want certs, or flags alone to serve (run 'sluice webhook --help')", args[0])}
		}
		fs := flag.NewFlagSet("webhook", flag.ContinueOnError)
		addr := fs.String("addr", ":9443", "where to serve HTTPS: POST /inject (admission reviews) and GET /healthz")
		tlsDir := fs.String("tls-dir", "/tls", "the directory with tls.crt and tls.key (the Secret 'sluice webhook certs' makes, mounted)")
		image := fs.String("image", "", "the Sluice image (default: the template's, sluice:dev)")
		cniMode := fs.Bool("cni", false, "for nodes with the sluice-cni plugin: the sidecar and the annotations asking the plugin\n"+
			"for capture, no init container and no volume (the pod needs no privilege: Pod Security \"restricted\")")
		logFormat := fs.String("log-format", "text", "text or json")
		logLevel := fs.String("log-level", "info", "debug, info, warn or error")
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		log, err := newLogger(os.Stderr, *logFormat, *logLevel)
		if err != nil {
			return err
		}
		crt, key := filepath.Join(*tlsDir, "tls.crt"), filepath.Join(*tlsDir, "tls.key")
		for _, f := range []string{crt, key} {
			if _, err := os.Stat(f); err != nil {
				return usageError{fmt.Sprintf("--tls-dir %s has no %s: create the Secret with 'sluice webhook certs | kubectl apply -f -'", *tlsDir, filepath.Base(f))}
			}
		}
		h := webhook.Handler(deploy.PodTemplate, inject.Options{Image: *image, CNI: *cniMode}, log)
		return webhook.Serve(ctx, *addr, crt, key, h, log)
	}
	return c
}

func webhookCerts(c command, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("webhook certs", flag.ContinueOnError)
	namespace := fs.String("namespace", "sluice-system", "the webhook's namespace: where the Secret goes and its Service is")
	service := fs.String("service", "sluice-webhook", "the webhook's Service, which the certificate names and the API server calls")
	validFor := fs.Duration("valid-for", 365*24*time.Hour, "how long the certificate is valid")
	alsoTrust := fs.String("also-trust", "", "a PEM file of CA certificates the configuration trusts too: the one in force, when renewing")
	if err := parseFlags(fs, c, args, stdout); err != nil {
		return err
	}
	var trusted []byte
	if *alsoTrust != "" {
		var err error
		if trusted, err = readCAs(*alsoTrust); err != nil {
			return usageError{fmt.Sprintf("--also-trust %s: %v", *alsoTrust, err)}
		}
	}
	for _, f := range [][2]string{{"--namespace", *namespace}, {"--service", *service}} {
		if !dnsLabel.MatchString(f[1]) {
			return usageError{fmt.Sprintf("%s %q: want a DNS label (lowercase letters, digits and '-', at most 63)", f[0], f[1])}
		}
	}
	if *validFor <= 0 {
		return usageError{fmt.Sprintf("--valid-for %v: want a positive duration, e.g. 8760h", *validFor)}
	}
	out, err := webhookManifests(*namespace, *service, *validFor, trusted)
	if err != nil {
		return err
	}
	_, err = stdout.Write(out)
	return err
}

// dnsLabel is what a namespace or Service name may be (RFC 1123), so both
// go into YAML and certificates as they are.
var dnsLabel = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)

// readCAs reads a PEM file of CA certificates, each of which must parse.
func readCAs(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	n := 0
	for rest := data; ; n++ {
		var block *pem.Block
		if block, rest = pem.Decode(rest); block == nil {
			break
		}
		if _, err := x509.ParseCertificate(block.Bytes); block.Type != "CERTIFICATE" || err != nil {
			return nil, fmt.Errorf("PEM block %d is no certificate (%s): give the caBundle in force, base64-decoded", n+1, block.Type)
		}
	}
	if n == 0 {
		return nil, errors.New("no PEM certificate in it: give the caBundle in force, base64-decoded")
	}
	return data, nil
}

// webhookManifests is the Secret with a new serving key pair and the
// webhook configuration trusting its CA (and the CAs of trusted, PEM), as
// one YAML stream.
func webhookManifests(namespace, service string, validFor time.Duration, trusted []byte) ([]byte, error) {
	caPEM, certPEM, keyPEM, err := webhook.GenerateCerts(service, namespace, validFor)
	if err != nil {
		return nil, err
	}
	caPEM = append(caPEM, trusted...)
	var out bytes.Buffer
	fmt.Fprintf(&out, `# The webhook's serving key pair, for %s.%s.svc, made by sluice webhook certs.
apiVersion: v1
kind: Secret
metadata:
  name: sluice-webhook-tls
  namespace: %s
type: kubernetes.io/tls
data:
  tls.crt: %s
  tls.key: %s
---
`, service, namespace, namespace, base64.StdEncoding.EncodeToString(certPEM), base64.StdEncoding.EncodeToString(keyPEM))

	// The configuration as a tree, so its comments come along.
	var doc yaml.Node
	if err := yaml.Unmarshal(deploy.WebhookConfiguration, &doc); err != nil {
		return nil, fmt.Errorf("the webhook configuration: %w", err)
	}
	webhooks := mappingValue(doc.Content[0], "webhooks")
	if len(webhooks.Content) == 0 {
		return nil, errors.New("the webhook configuration has no webhooks")
	}
	for _, wh := range webhooks.Content {
		cc := mappingValue(wh, "clientConfig")
		setScalar(cc, "caBundle", base64.StdEncoding.EncodeToString(caPEM))
		svc := mappingValue(cc, "service")
		setScalar(svc, "name", service)
		setScalar(svc, "namespace", namespace)
	}
	enc := yaml.NewEncoder(&out)
	enc.SetIndent(2)
	if err := enc.Encode(&doc); err != nil {
		return nil, fmt.Errorf("the webhook configuration: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("the webhook configuration: %w", err)
	}
	return out.Bytes(), nil
}

// mappingValue is the value of key in mapping m, made an empty mapping
// there if m lacks it.
func mappingValue(m *yaml.Node, key string) *yaml.Node {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	v := &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
	m.Content = append(m.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: key}, v)
	return v
}

// setScalar sets key in mapping m to the string value.
func setScalar(m *yaml.Node, key, value string) {
	v := mappingValue(m, key)
	*v = yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: value}
}
