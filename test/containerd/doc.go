// Package containerd proves the CNI plugin under a real container runtime: Debian's
// containerd 1.6 drives netagent-cni through the CRI, exactly as a kubelet would.
//
// Design: everything the runtime owns lives in one temporary directory (root, state, runc
// root, sockets, CNI conf and bin dirs, pod network namespaces via
// netns_mounts_under_state_dir) and containerd runs inside a throw-away "node" network
// namespace entered with nsenter, so the root network namespace is never changed and a
// crashed run leaves nothing a later run could trip over. The sandbox image is built in Go
// from the host's static busybox and imported with ctr; no registry is contacted.
//
// Cleanup does not trust the runtime: after the CRI removal pass it kills every process in
// the test's cgroup parent or referencing the temp dir (shims survive containerd), unmounts
// whatever is still mounted below the temp dir and removes the cgroups, so a failed run
// leaves no process, mount or namespace behind.
//
// Scale: one containerd and a handful of pods per test; a run takes a few seconds. The
// tests need root and skip without it (fail with CI set).
package containerd
