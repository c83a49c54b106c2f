package testbed

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// LogEntry is one line of a process's slog JSON output.
type LogEntry map[string]any

// Str returns a field as a string ("" when absent).
func (e LogEntry) Str(key string) string {
	s, _ := e[key].(string)
	return s
}

// Num returns a numeric field (JSON numbers decode as float64).
func (e LogEntry) Num(key string) int64 {
	f, _ := e[key].(float64)
	return int64(f)
}

// Logged is a process started in a pod whose stderr is read as slog JSON
// lines, so tests and the demo can wait for what the sidecar reports (the
// original destination it saw) instead of sleeping.
type Logged struct {
	Cmd  *exec.Cmd
	mu   sync.Mutex
	cond *sync.Cond
	logs []LogEntry
	raw  strings.Builder // every line, for failure messages
	done bool
}

// StartLogged starts cmd in the pod with stderr parsed as JSON log lines.
func (p *Pod) StartLogged(cmd *exec.Cmd) (*Logged, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("log pipe: %w", err)
	}
	cmd.Stderr = w
	l := &Logged{Cmd: cmd}
	l.cond = sync.NewCond(&l.mu)
	if err := p.Start(cmd); err != nil {
		r.Close()
		w.Close()
		return nil, err
	}
	w.Close()
	go l.read(r)
	return l, nil
}

func (l *Logged) read(r io.ReadCloser) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var e LogEntry
		l.mu.Lock()
		l.raw.WriteString(sc.Text() + "\n")
		if json.Unmarshal(sc.Bytes(), &e) == nil {
			l.logs = append(l.logs, e)
		}
		l.cond.Broadcast()
		l.mu.Unlock()
	}
	l.mu.Lock()
	l.done = true
	l.cond.Broadcast()
	l.mu.Unlock()
}

// WaitFor returns the first entry with message msg for which match (nil
// matches all) is true, waiting up to timeout for it to be logged.
func (l *Logged) WaitFor(msg string, match func(LogEntry) bool, timeout time.Duration) (LogEntry, error) {
	timer := time.AfterFunc(timeout, func() {
		l.mu.Lock()
		l.cond.Broadcast()
		l.mu.Unlock()
	})
	defer timer.Stop()
	deadline := time.Now().Add(timeout)
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		for _, e := range l.logs {
			if e.Str("msg") == msg && (match == nil || match(e)) {
				return e, nil
			}
		}
		if l.done || !time.Now().Before(deadline) {
			state := "still running"
			if l.done {
				state = "exited"
			}
			return nil, fmt.Errorf("no %q log line within %s (process %s); its output:\n%s", msg, timeout, state, l.raw.String())
		}
		l.cond.Wait()
	}
}

// Entries returns every entry logged with message msg so far.
func (l *Logged) Entries(msg string) []LogEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []LogEntry
	for _, e := range l.logs {
		if e.Str("msg") == msg {
			out = append(out, e)
		}
	}
	return out
}

// Output returns everything the process has written to stderr so far.
func (l *Logged) Output() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.raw.String()
}

// WaitListening waits until a TCP socket in the pod listens on port. It reads
// /proc/thread-self/net from inside the pod's netns: probing with a connect
// would itself be a connection for the proxy to handle.
func (p *Pod) WaitListening(port uint16, timeout time.Duration) error {
	want := fmt.Sprintf(":%04X", port)
	deadline := time.Now().Add(timeout)
	for {
		found := false
		err := p.Do(func() error {
			for _, f := range []string{"/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"} {
				data, err := os.ReadFile(f)
				if err != nil {
					return err
				}
				for _, line := range strings.Split(string(data), "\n")[1:] {
					// sl local_address rem_address st ...; st 0A is LISTEN.
					fields := strings.Fields(line)
					if len(fields) > 3 && strings.HasSuffix(fields[1], want) && fields[3] == "0A" {
						found = true
					}
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("read sockets of pod %s: %w", p.Name, err)
		}
		if found {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listens on port %d in pod %s after %s", port, p.Name, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
