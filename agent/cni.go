package agent

import (
	"errors"
	"fmt"

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
