package kube

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.yaml.in/yaml/v3"
)

// Client reaches the API server: its address, how it is trusted, and the
// credentials sent.
type Client struct {
	server string // https://host:port
	http   *http.Client
	// tokenFile is read again when it changes: the kubelet rotates a
	// projected service account token in place.
	tokenFile string
	token     string
	mu        sync.Mutex
	tokenMod  time.Time
}

// The service account's files in a pod.
const serviceAccount = "/var/run/secrets/kubernetes.io/serviceaccount"

// InCluster is the Client of the pod's service account.
func InCluster() (*Client, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, errors.New("KUBERNETES_SERVICE_HOST and _PORT are not set: not in a pod")
	}
	ca, err := os.ReadFile(filepath.Join(serviceAccount, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("no service account token mounted (automountServiceAccountToken: true?): %w", err)
	}
	c, err := newClient("https://"+net.JoinHostPort(host, port), ca, nil)
	if err != nil {
		return nil, err
	}
	c.tokenFile = filepath.Join(serviceAccount, "token")
	if _, err := c.bearer(); err != nil {
		return nil, err
	}
	return c, nil
}

// FromKubeconfig is the Client of a kubeconfig's current context: its
// cluster's server and CA, its user's token or client certificate.
func FromKubeconfig(path string) (*Client, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var kc struct {
		CurrentContext string `yaml:"current-context"`
		Contexts       []struct {
			Name    string `yaml:"name"`
			Context struct {
				Cluster string `yaml:"cluster"`
				User    string `yaml:"user"`
			} `yaml:"context"`
		} `yaml:"contexts"`
		Clusters []struct {
			Name    string `yaml:"name"`
			Cluster struct {
				Server     string `yaml:"server"`
				CA         string `yaml:"certificate-authority"`
				CAData     string `yaml:"certificate-authority-data"`
				SkipVerify bool   `yaml:"insecure-skip-tls-verify"`
			} `yaml:"cluster"`
		} `yaml:"clusters"`
		Users []struct {
			Name string `yaml:"name"`
			User struct {
				Token     string `yaml:"token"`
				TokenFile string `yaml:"tokenFile"`
				Cert      string `yaml:"client-certificate"`
				CertData  string `yaml:"client-certificate-data"`
				Key       string `yaml:"client-key"`
				KeyData   string `yaml:"client-key-data"`
			} `yaml:"user"`
		} `yaml:"users"`
	}
	if err := yaml.Unmarshal(data, &kc); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var clusterName, userName string
	for _, c := range kc.Contexts {
		if c.Name == kc.CurrentContext || kc.CurrentContext == "" && len(kc.Contexts) == 1 {
			clusterName, userName = c.Context.Cluster, c.Context.User
		}
	}
	rel := func(p string) string {
		if p != "" && !filepath.IsAbs(p) {
			return filepath.Join(filepath.Dir(path), p)
		}
		return p
	}
	// file or data: a path's contents, else the base64 data.
	fileOr := func(file, data string) ([]byte, error) {
		if file != "" {
			return os.ReadFile(rel(file))
		}
		if data == "" {
			return nil, nil
		}
		return base64.StdEncoding.DecodeString(data)
	}
	for _, cl := range kc.Clusters {
		if cl.Name != clusterName {
			continue
		}
		if cl.Cluster.SkipVerify {
			return nil, fmt.Errorf("%s: insecure-skip-tls-verify: Sluice trusts the API server by its CA only", path)
		}
		ca, err := fileOr(cl.Cluster.CA, cl.Cluster.CAData)
		if err != nil {
			return nil, fmt.Errorf("%s: the cluster's CA: %w", path, err)
		}
		var cert *tls.Certificate
		var c *Client
		for _, u := range kc.Users {
			if u.Name != userName {
				continue
			}
			certPEM, err := fileOr(u.User.Cert, u.User.CertData)
			if err != nil {
				return nil, fmt.Errorf("%s: the user's certificate: %w", path, err)
			}
			keyPEM, err := fileOr(u.User.Key, u.User.KeyData)
			if err != nil {
				return nil, fmt.Errorf("%s: the user's key: %w", path, err)
			}
			if certPEM != nil {
				pair, err := tls.X509KeyPair(certPEM, keyPEM)
				if err != nil {
					return nil, fmt.Errorf("%s: the user's certificate: %w", path, err)
				}
				cert = &pair
			}
			if c, err = newClient(cl.Cluster.Server, ca, cert); err != nil {
				return nil, err
			}
			c.token, c.tokenFile = u.User.Token, rel(u.User.TokenFile)
		}
		if c == nil {
			return nil, fmt.Errorf("%s: no user %q", path, userName)
		}
		return c, nil
	}
	return nil, fmt.Errorf("%s: no cluster of the current context %q", path, kc.CurrentContext)
}

func newClient(server string, ca []byte, cert *tls.Certificate) (*Client, error) {
	u, err := url.Parse(server)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("API server %q: want https://HOST:PORT", server)
	}
	pool := x509.NewCertPool()
	if len(ca) > 0 && !pool.AppendCertsFromPEM(ca) {
		return nil, errors.New("the API server's CA is no PEM certificate")
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if len(ca) == 0 {
		cfg.RootCAs = nil // the system's
	}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig, tr.Proxy = cfg, nil
	return &Client{server: strings.TrimSuffix(server, "/"), http: &http.Client{Transport: tr}}, nil
}

// bearer is the token to send: the file's, read again when it changed.
func (c *Client) bearer() (string, error) {
	if c.tokenFile == "" {
		return c.token, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	st, err := os.Stat(c.tokenFile)
	if err != nil {
		return "", fmt.Errorf("the service account token: %w", err)
	}
	if !st.ModTime().Equal(c.tokenMod) {
		data, err := os.ReadFile(c.tokenFile)
		if err != nil {
			return "", fmt.Errorf("the service account token: %w", err)
		}
		c.token, c.tokenMod = strings.TrimSpace(string(data)), st.ModTime()
	}
	return c.token, nil
}

func (c *Client) do(ctx context.Context, method, path string, q url.Values, body io.Reader) (*http.Response, error) {
	return c.doAs(ctx, method, path, q, body, "application/json")
}

// doAs is do with the body's content type: a patch's says how to apply it.
func (c *Client) doAs(ctx context.Context, method, path string, q url.Values, body io.Reader, contentType string) (*http.Response, error) {
	u := c.server + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	token, err := c.bearer()
	if err != nil {
		return nil, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", contentType)
	}
	req.Header.Set("User-Agent", "sluice")
	return c.http.Do(req)
}

// ErrNotFound is a 404: on a list, the API server does not serve the
// kind; on an object, it does not exist.
var ErrNotFound = errors.New("not found")

// ErrConflict is a 409: the object changed since it was read (a patch that
// names the resourceVersion it was made from).
var ErrConflict = errors.New("changed since read")

// Get reads the object or list at path into into.
func (c *Client) Get(ctx context.Context, path string, q url.Values, into any) error {
	return c.get(ctx, path, q, into)
}

// MergePatch applies a JSON merge patch (RFC 7386) to the object at path.
func (c *Client) MergePatch(ctx context.Context, path string, patch any) error {
	data, err := json.Marshal(patch)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := c.doAs(ctx, http.MethodPatch, path, nil, bytes.NewReader(data), "application/merge-patch+json")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return status(resp, path)
}

func (c *Client) get(ctx context.Context, path string, q url.Values, into any) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	resp, err := c.do(ctx, http.MethodGet, path, q, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := status(resp, path); err != nil {
		return err
	}
	return json.NewDecoder(resp.Body).Decode(into)
}

func (c *Client) stream(ctx context.Context, path string, q url.Values) (io.ReadCloser, error) {
	resp, err := c.do(ctx, http.MethodGet, path, q, nil)
	if err != nil {
		return nil, err
	}
	if err := status(resp, path); err != nil {
		resp.Body.Close()
		return nil, err
	}
	return resp.Body, nil
}

func (c *Client) post(ctx context.Context, path string, obj any) error {
	data, err := json.Marshal(obj)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := c.do(ctx, http.MethodPost, path, nil, bytes.NewReader(data))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return status(resp, path)
}

// status is nil for a 2xx answer, ErrNotFound for a 404, ErrConflict for
// a 409, else the API server's message.
func status(resp *http.Response, path string) error {
	if resp.StatusCode/100 == 2 {
		return nil
	}
	if resp.StatusCode == http.StatusNotFound {
		return fmt.Errorf("%s: %w", path, ErrNotFound)
	}
	var s struct {
		Message string `json:"message"`
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if json.Unmarshal(body, &s) != nil || s.Message == "" {
		s.Message = string(bytes.TrimSpace(body))
	}
	if resp.StatusCode == http.StatusConflict {
		return fmt.Errorf("%s: %w: %s", path, ErrConflict, s.Message)
	}
	return fmt.Errorf("%s: %s: %s", path, strconv.Itoa(resp.StatusCode)+" "+http.StatusText(resp.StatusCode), s.Message)
}
