#!/bin/bash
# A lab node's containerd, kubelet and kube-proxy. Started as
#   nsenter --net=/run/netns/NODE-NS unshare -m --propagation private bash node.sh
# so that its mounts live in a mount namespace of its own: a fresh sysfs for the node's
# network namespace with the host's cgroup tree re-bound on it, and per-node folders on
# the paths a kubelet, a CNI plugin and the netagent DaemonSet expect (/var/lib/kubelet,
# /etc/cni/net.d, /opt/cni/bin, /run/netagent, the WireGuard key and socket folders, ...).
# Nothing shows in the root mount namespace, and everything is gone when the last process
# in it exits.
set -euo pipefail
node={{.Name}} ip={{.IP}} d={{.Dir}} kbin={{.KubeBin}}

mkdir -p "$d/cgroup"
mount --rbind /sys/fs/cgroup "$d/cgroup"
mount -t sysfs sysfs /sys
mount --rbind "$d/cgroup" /sys/fs/cgroup
umount -l "$d/cgroup"
for p in /run/netns /run/containerd; do mkdir -p "$p"; mount -t tmpfs tmpfs "$p"; done
for m in var-lib-kubelet:/var/lib/kubelet var-log-pods:/var/log/pods var-log-containers:/var/log/containers \
	etc-cni-net.d:/etc/cni/net.d opt-cni-bin:/opt/cni/bin run-netagent:/run/netagent \
	var-lib-cni:/var/lib/cni var-lib-netagent:/var/lib/netagent var-run-wireguard:/var/run/wireguard; do
	src="$d/root/${m%%:*}" dst=${m#*:}
	mkdir -p "$src" "$dst"
	mount --bind "$src" "$dst"
done
mount --make-rshared /
install -m 0755 {{.Loopback}} /opt/cni/bin/loopback

containerd -c "$d/containerd.toml" >"$d/containerd.log" 2>&1 &
for _ in $(seq 100); do [ -S "$d/containerd.sock" ] && break; sleep 0.1; done
for img in {{range .Images}}{{.}} {{end}}; do
	ctr --address "$d/containerd.sock" -n k8s.io images import --snapshotter {{.Snapshotter}} "$img" >/dev/null
done
for alias in {{range .Aliases}}{{.}} {{end}}; do
	ctr --address "$d/containerd.sock" -n k8s.io images tag --force {{.Netagent}} "$alias" >/dev/null
done

# Pod cgroups go below /CGROUPROOT in every v1 hierarchy, so limits hold per node.
for h in /sys/fs/cgroup/*/; do
	case $h in */unified/) continue ;; esac
	mkdir -p "${h}{{.CgroupRoot}}"
done
cat /sys/fs/cgroup/cpuset/cpuset.cpus >/sys/fs/cgroup/cpuset/{{.CgroupRoot}}/cpuset.cpus
cat /sys/fs/cgroup/cpuset/cpuset.mems >/sys/fs/cgroup/cpuset/{{.CgroupRoot}}/cpuset.mems

# Restarted when it exits, as a service manager would (Cluster.RestartKubelet stops it).
while :; do
	"$kbin/kubelet" --config "$d/kubelet.yaml" --kubeconfig "$d/kubelet.kubeconfig" --hostname-override "$node" \
		--node-ip "$ip" --root-dir /var/lib/kubelet --cert-dir "$d/kubelet-pki" >>"$d/kubelet.log" 2>&1 &
	echo $! >"$d/kubelet.pid"
	wait $! || true
	sleep 1
done &
"$kbin/kube-proxy" --config "$d/kube-proxy.yaml" >"$d/kube-proxy.log" 2>&1 &
echo started
wait
