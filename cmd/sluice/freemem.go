package main

import (
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"syscall"
)

// freeMemoryEnv, set to 1 in the environment of 'sluice run', makes SIGUSR1
// run a garbage collection and return the freed memory to the kernel
// (debug.FreeOSMemory). It is for measurements only (make bench takes the
// sidecar's resident memory from a settled process) and off by default: it
// is not a flag, and only whoever starts the sidecar can set it. Only root
// or the sidecar's own uid can signal it, and a signal costs at most one
// collection.
const freeMemoryEnv = "SLUICE_FREE_MEMORY_ON_SIGUSR1"

// freeMemoryOnSignal serves SIGUSR1 when freeMemoryEnv asks for it; the
// returned function stops it.
func freeMemoryOnSignal() (stop func()) {
	if os.Getenv(freeMemoryEnv) != "1" {
		return func() {}
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGUSR1)
	go func() {
		for range sigs {
			runtime.GC()
			debug.FreeOSMemory()
		}
	}()
	return func() { signal.Stop(sigs); close(sigs) }
}
