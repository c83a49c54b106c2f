package webhook

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"
)

// Serve serves h over HTTPS on addr until ctx is done, then shuts down
// gracefully. The key pair is read from certFile and keyFile, and read
// again when either changes.
func Serve(ctx context.Context, addr, certFile, keyFile string, h http.Handler, log *slog.Logger) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", addr, err)
	}
	return ServeListener(ctx, ln, certFile, keyFile, h, log)
}

// ServeListener is Serve on a listener of the caller's; it closes ln.
func ServeListener(ctx context.Context, ln net.Listener, certFile, keyFile string, h http.Handler, log *slog.Logger) error {
	kp := &keyPair{certFile: certFile, keyFile: keyFile, log: log}
	// The first pair must load: a webhook that can finish no handshake
	// blocks every pod its configuration sends it.
	if _, err := kp.load(); err != nil {
		ln.Close()
		return err
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: kp.get},
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- srv.ServeTLS(ln, "", "") }()
	log.Info("webhook serving", "addr", ln.Addr().String(), "cert", certFile)
	select {
	case err := <-served:
		return fmt.Errorf("serve on %s: %w", ln.Addr(), err)
	case <-ctx.Done():
	}
	// The API server's calls time out after the webhook's timeoutSeconds
	// (10): those in flight get as long to finish.
	shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdown); err != nil {
		return fmt.Errorf("shut down: %w", err)
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve on %s: %w", ln.Addr(), err)
	}
	return nil
}

// keyPair is the serving certificate, read again on a handshake after its
// files changed: a Secret mounted as a volume is updated in place, so
// renewing it (sluice webhook certs | kubectl apply -f -) needs no restart.
type keyPair struct {
	certFile, keyFile string
	log               *slog.Logger

	mu              sync.Mutex
	cert            *tls.Certificate
	certMod, keyMod time.Time // of the files cert was read from
}

// load reads the pair if either file's modification time is not the one
// it was read at; else it keeps the pair it has.
func (k *keyPair) load() (*tls.Certificate, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	// os.Stat follows the symbolic links a Secret volume's files are:
	// an update points them at new files, with new times.
	certInfo, err := os.Stat(k.certFile)
	if err != nil {
		return k.cert, fmt.Errorf("the serving certificate: %w", err)
	}
	keyInfo, err := os.Stat(k.keyFile)
	if err != nil {
		return k.cert, fmt.Errorf("the serving key: %w", err)
	}
	if k.cert != nil && certInfo.ModTime().Equal(k.certMod) && keyInfo.ModTime().Equal(k.keyMod) {
		return k.cert, nil
	}
	cert, err := tls.LoadX509KeyPair(k.certFile, k.keyFile)
	if err != nil {
		// The times are not recorded: the next handshake tries again,
		// as when the two files were caught between writes.
		return k.cert, fmt.Errorf("the serving key pair %s, %s: %w", k.certFile, k.keyFile, err)
	}
	if k.cert != nil {
		k.log.Info("serving certificate reloaded", "cert", k.certFile)
	}
	k.cert, k.certMod, k.keyMod = &cert, certInfo.ModTime(), keyInfo.ModTime()
	return k.cert, nil
}

// get is tls.Config.GetCertificate: a pair that fails to load again leaves
// the last good one serving.
func (k *keyPair) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	cert, err := k.load()
	if err != nil {
		k.log.Warn("serving certificate not reloaded, the last one serves", "error", err)
	}
	return cert, nil
}
