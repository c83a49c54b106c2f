package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
)

// Uninstall detaches every program of t's install and removes its pins and
// its pin directory, and nothing else: the record is checked first (the pins
// must be Sluice's and belong to t's cgroup) and removed last, so an
// uninstall killed half-way finishes when run again. Files Sluice did not
// create stay, and so does the directory holding them. ErrNotInstalled
// means there was nothing to remove.
func Uninstall(t Target, log *slog.Logger) error {
	root := filepath.Dir(t.PinDir)
	if _, err := os.Stat(root); err == nil {
		unlock, err := lock(root)
		if err != nil {
			return err
		}
		defer unlock()
	}
	cur, err := readPins(t.PinDir)
	if err != nil {
		return err
	}
	switch {
	case !cur.exists:
		return fmt.Errorf("%w on %s: no pins at %s", ErrNotInstalled, t.Cgroup, t.PinDir)
	case cur.rec == nil && len(cur.names) > 0:
		return fmt.Errorf("%s is not a Sluice pin directory (no install record; it holds %v): nothing removed", t.PinDir, cur.names)
	case cur.rec == nil:
		// What a killed install or uninstall leaves: an empty directory.
		if err := os.Remove(t.PinDir); err != nil {
			return fmt.Errorf("remove empty pin dir: %w", err)
		}
		return nil
	}
	if err := checkOwner(t, *cur.rec); err != nil {
		return err
	}

	// Inbound steering stops first, then connect stops redirecting.
	var errs []error
	errs = append(errs, removeLink(filepath.Join(t.PinDir, legacyTCPin)))
	for i := len(allHooks) - 1; i >= 0; i-- {
		errs = append(errs, removeLink(filepath.Join(t.PinDir, allHooks[i].pin)))
	}
	// The node's programs find the pod no more; its build goes with the
	// last pod that runs it.
	if rec := cur.rec; rec.Object != "" {
		errs = append(errs, leaveNode(root, rec.Object, rec.Index, t.PinDir))
	}
	unpin := slices.Clone(legacyPins[1:])
	names := podMapNames
	for i := len(names) - 1; i >= 0; i-- {
		unpin = append(unpin, names[i])
	}
	for _, name := range unpin {
		if err := os.Remove(filepath.Join(t.PinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("unpin map %s: %w", name, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if left := cur.unknown(); len(left) > 0 {
		return fmt.Errorf("uninstalled, but left %s: it also holds files Sluice did not create (%v)", t.PinDir, left)
	}
	if err := os.Remove(t.PinDir); err != nil {
		return fmt.Errorf("remove pin dir: %w", err)
	}
	log.Debug("uninstalled", "cgroup", t.Cgroup, "pin_dir", t.PinDir)
	return nil
}
