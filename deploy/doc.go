// Package deploy holds how iketcp is deployed, and tests that hold it to
// the binary: systemd units per mode (deploy/systemd), Kubernetes
// manifests for the sidecar use (deploy/kubernetes); the Dockerfile is at
// the repository's root. The tests run systemd-analyze on the units and
// check every flag, variable, port and path the units and manifests use
// against the binary's own --help. It has no code of its own.
package deploy
