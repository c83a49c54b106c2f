// Package deploy holds what users apply to a cluster: the Kubernetes
// manifests (pod/, agent/, the kustomization), the Grafana dashboard and the
// Prometheus scrape jobs and rules. Its tests decode every manifest strictly
// into the Kubernetes API types and check the privileges each container gets.
package deploy
