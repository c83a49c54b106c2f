package main

import (
	"os"
	"syscall"
	"testing"
	"time"
)

// With the switch on, SIGUSR1 frees memory instead of killing the process
// (its default action); off, nothing is installed.
func TestFreeMemoryOnSignal(t *testing.T) {
	freeMemoryOnSignal()() // off: a no-op to stop
	t.Setenv(freeMemoryEnv, "1")
	stop := freeMemoryOnSignal()
	defer stop()
	if err := syscall.Kill(os.Getpid(), syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // a process killed by it ends here
}
