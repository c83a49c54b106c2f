package webhook

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"time"
)

// GenerateCerts makes the webhook's TLS: a self-signed CA, whose PEM goes
// into the webhook configuration's caBundle for the API server to trust,
// and a serving certificate it signed for the webhook's Service (service,
// in namespace), valid for validFor. The CA's key is thrown away: it signs
// this one certificate, and a renewal makes a new pair of both.
func GenerateCerts(service, namespace string, validFor time.Duration) (caPEM, certPEM, keyPEM []byte, err error) {
	if validFor <= 0 {
		return nil, nil, nil, fmt.Errorf("validity %v: want a positive duration", validFor)
	}
	if service == "" || namespace == "" {
		return nil, nil, nil, errors.New("the certificate needs the webhook's Service name and namespace")
	}
	// Back an hour, for the API server's clock a little behind ours.
	notBefore := time.Now().Add(-time.Hour)
	notAfter := notBefore.Add(time.Hour + validFor)

	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("generate the CA's key: %w", err)
	}
	// No SerialNumber in either certificate: x509 picks random ones.
	ca := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "sluice-webhook-ca"},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("sign the CA: %w", err)
	}
	if ca, err = x509.ParseCertificate(caDER); err != nil {
		return nil, nil, nil, fmt.Errorf("the CA: %w", err)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("generate the serving key: %w", err)
	}
	svc := service + "." + namespace + ".svc"
	leaf := &x509.Certificate{
		Subject: pkix.Name{CommonName: svc},
		// The names the API server may call the Service by.
		DNSNames:    []string{service, service + "." + namespace, svc, svc + ".cluster.local"},
		NotBefore:   notBefore,
		NotAfter:    notAfter,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("sign the serving certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("encode the serving key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}
