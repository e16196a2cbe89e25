// Package deploy holds what installs colo, and its tests: the default
// config (config.toml, docs/config.md's, checked against config.Default),
// containerd's runtime snippet (containerd-colo.toml), install.sh (make
// install, make uninstall, the release tarball), and for Kubernetes the
// installer DaemonSet (kubernetes/installer.yaml, node-setup.sh,
// Dockerfile) and the RuntimeClass (kubernetes/runtimeclass.yaml).
// docs/install.md.
package deploy
