#!/usr/bin/env bash
# The README's lab command. Until `netagent lab` (multi-node, etcd, agents) lands, this shows
# the CNI plugin on one node: it builds netagent-cni, creates a node namespace with an
# outside host beside it, wires pods through the real plugin binary, prints each pod's
# wiring and a connectivity matrix measured with real pings, publishes a host port, and
# removes everything again. Nothing in the root network namespace is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
[ "$(id -u)" = 0 ] || { echo "run as root: the lab creates network namespaces"; exit 1; }

pods=${PODS:-3}
lab="nalab$$"
work=$(mktemp -d /tmp/netagent-lab.XXXXXX)
bin="$work/bin"
t0=$(date +%s%N)
step() { printf '[%6.0f ms] %s\n' "$(( ($(date +%s%N) - t0) / 1000000 ))" "$*"; }
cleanup() {
	for n in $(ip netns list | awk '{print $1}' | grep "^$lab-" || true); do ip netns pids "$n" | xargs -r kill -9 2>/dev/null || true; ip netns del "$n"; done
	rm -rf "$work"
}
trap cleanup EXIT

step "building netagent-cni"
mkdir -p "$bin"
CGO_ENABLED=0 go build -o "$bin/netagent-cni" ./cmd/cni-plugin

step "node namespace $lab-node with an outside host $lab-ext on 192.0.2.0/24"
ip netns add "$lab-node"; ip netns add "$lab-ext"
ip link add eth0 netns "$lab-node" type veth peer name eth0 netns "$lab-ext"
ip -n "$lab-node" addr add 192.0.2.10/24 dev eth0; ip -n "$lab-node" link set eth0 up; ip -n "$lab-node" link set lo up
ip -n "$lab-ext" addr add 192.0.2.20/24 dev eth0; ip -n "$lab-ext" link set eth0 up; ip -n "$lab-ext" link set lo up
ip -n "$lab-ext" route add 10.244.1.0/24 via 192.0.2.10

conf() {
	cat <<JSON
{"cniVersion":"1.0.0","name":"netagent","type":"netagent-cni","bridge":"cni0","subnet":"10.244.1.0/24","dataDir":"$work/ipam"$1}
JSON
}
cni() { # cni COMMAND POD [extra-config]
	nsenter --net="/run/netns/$lab-node" env CNI_COMMAND="$1" CNI_CONTAINERID="$2" CNI_NETNS="/run/netns/$lab-$2" \
		CNI_IFNAME=eth0 CNI_PATH="$bin" "$bin/netagent-cni" <<<"$(conf "${3:-}")"
}

declare -A ip
for i in $(seq 1 "$pods"); do
	p="pod$i"
	ip netns add "$lab-$p"
	ip -n "$lab-$p" link set lo up # a runtime's loopback plugin does this
	extra=""
	[ "$i" = 1 ] && extra=',"runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}'
	s=$(date +%s%N)
	out=$(cni ADD "$p" "$extra")
	ip[$p]=$(grep -o '"address": "[0-9.]*' <<<"$out" | cut -d'"' -f4)
	step "ADD $p -> ${ip[$p]} ($(( ($(date +%s%N) - s) / 1000 )) µs)"
done

echo
echo "node $lab-node:"
ip -n "$lab-node" -br addr show cni0
ip -n "$lab-node" -br link show master cni0
echo
printf '%-8s' "from\\to"; for q in gateway $(seq -f 'pod%g' 1 "$pods") outside; do printf '%-9s' "$q"; done; echo
for i in $(seq 1 "$pods"); do
	p="pod$i"; printf '%-8s' "$p"
	for dst in 10.244.1.1 $(for j in $(seq 1 "$pods"); do echo "${ip[pod$j]}"; done) 192.0.2.20; do
		if ip netns exec "$lab-$p" ping -c1 -W1 -q "$dst" >/dev/null 2>&1; then printf '%-9s' ok; else printf '%-9s' FAIL; fi
	done
	echo
done
echo "(pod -> outside works because the outside host routes 10.244.1.0/24 to the node; masquerade is the agent's job)"
echo
ip netns exec "$lab-pod1" busybox nc -l -p 80 -e echo "hello from pod1" &
sleep 0.3
step "host port: outside host -> 192.0.2.10:8080 -> pod1:80 says: $(ip netns exec "$lab-ext" busybox nc -w 2 192.0.2.10 8080 || echo FAILED)"
echo
echo "To poke at it by hand while it runs, e.g.: ip netns exec $lab-node iptables -t nat -S NETAGENT-HOSTPORTS"
for i in $(seq 1 "$pods"); do
	s=$(date +%s%N)
	cni DEL "pod$i"
	step "DEL pod$i ($(( ($(date +%s%N) - s) / 1000 )) µs)"
done
step "left on the node after DEL: $(ip -n "$lab-node" -br link show master cni0 | wc -l) veths, $(ip netns exec "$lab-node" iptables-save -t nat | grep -c NETAGENT || true) NAT rules"
