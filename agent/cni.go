package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/cni"
)

// CNI says where the node's CNI plugins and network configuration are, for
// the agent to install sluice-cni there and keep it there.
type CNI struct {
	BinDir, ConfDir string
	Self            string // this executable, copied as sluice-cni
	PinRoot         string // the pins' root the plugin installs under
	CgroupRoot      string // the kubelet's --cgroup-root ("" for the top)
}

// ensureCNI puts sluice-cni in the node's CNI bin directory and its entry
// in the primary network configuration, each when it is not as it should
// be: the network plugin may rewrite its file (as Calico and flannel do on
// start), and the agent's next pass puts the entry back, saying so.
func (a *Agent) ensureCNI() error {
	c := a.opts.CNI
	if c == nil {
		return nil
	}
	// Run's passes and the watch both call it.
	a.cniMu.Lock()
	defer a.cniMu.Unlock()
	copied, berr := a.cniBin.Ensure()
	if berr != nil {
		berr = fmt.Errorf("install %s in %s: %w", cni.PluginType, c.BinDir, berr)
	} else if copied {
		a.opts.Logger.Info("CNI plugin installed", "bin_dir", c.BinDir, "plugin", cni.PluginType)
	}
	file, wrote, cerr := cni.InstallConf(c.ConfDir, cni.Entry(c.PinRoot, c.CgroupRoot))
	if cerr != nil {
		cerr = fmt.Errorf("chain %s into the network configuration in %s: %w", cni.PluginType, c.ConfDir, cerr)
	} else if wrote {
		a.opts.Logger.Info("CNI plugin chained into the network configuration", "file", file)
	}
	return errors.Join(berr, cerr)
}

// RemoveCNI takes sluice-cni out of the node's network configuration and
// bin directory (sluice agent --cni-uninstall). Pods it captured stay so
// until they go; new pods are no longer captured.
func RemoveCNI(c CNI) error {
	_, _, cerr := cni.RemoveConf(c.ConfDir)
	return errors.Join(cerr, cni.RemoveBinary(c.BinDir))
}

// watchCNI puts sluice-cni back as soon as something changes the node's
// CNI configuration or bin directory, rather than at the next pass: a pod
// whose sandbox is made while the entry is missing gets no capture, and
// its sidecar holds it unready until the pod is made again. It returns
// when ctx ends, or at once when the directories cannot be watched (the
// passes still restore the plugin).
func (a *Agent) watchCNI(ctx context.Context) {
	c := a.opts.CNI
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		a.opts.Logger.Warn("CNI directories not watched: the plugin is restored every pass only", "err", err)
		return
	}
	// Non-blocking, the file's reads go through Go's poller, so Close
	// ends a Read in progress.
	f := os.NewFile(uintptr(fd), "inotify")
	defer f.Close()
	const events = unix.IN_CLOSE_WRITE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_CREATE | unix.IN_DELETE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF
	for _, dir := range []string{c.ConfDir, c.BinDir} {
		if _, err := unix.InotifyAddWatch(fd, dir, events); err != nil {
			a.opts.Logger.Warn("CNI directory not watched: the plugin is restored every pass only", "dir", dir, "err", err)
			return
		}
	}
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer stop()
	buf := make([]byte, 64<<10)
	for {
		if _, err := f.Read(buf); err != nil {
			if ctx.Err() == nil {
				a.opts.Logger.Warn("CNI directories no longer watched: the plugin is restored every pass only", "err", err)
			}
			return
		}
		// A network plugin writes its files in a burst: take what
		// comes within 100 ms of the last event, then look once.
		for {
			f.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			if _, err := f.Read(buf); err != nil {
				break // quiet for 100 ms, or closed
			}
		}
		if ctx.Err() != nil {
			return
		}
		f.SetReadDeadline(time.Time{})
		if err := a.ensureCNI(); err != nil {
			a.opts.Logger.Error("CNI plugin: new pods asking for capture get none, and their sidecar holds them unready, until it is fixed", "err", err)
		}
	}
}
