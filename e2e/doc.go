// Package e2e holds Sluice's end-to-end tests: the sluice binary, built once
// from cmd/sluice by TestMain, installs capture into real pods (a network
// namespace, a veth pair and a cgroup v2 each, from internal/testbed) and
// real traffic goes through its sidecar, routes, telemetry and upgrades.
// The command line's own contract (help, usage, one-line errors) is tested
// in cmd/sluice; what each package does alone is tested beside it.
//
// Run them as root, from the repository, with go on PATH:
//
//	sudo go test -tags demo -count=1 -timeout 30m ./e2e/
//
// They take a few minutes. Without root every test skips, except under
// CI=true, where a skip is a failure (testbed.RequirePrivileged): CI runs
// them as root through make test. The test binary itself plays the helper
// processes in the pods (SLUICE_TEST_HELPER and testbed's roles).
package e2e
