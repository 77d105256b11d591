#!/usr/bin/env bash
# The README's lab command: builds netagent and netagent-cni into ./bin and brings up a
# multi-node cluster in network namespaces (`netagent lab up`), which stays up for poking
# at until `./bin/netagent lab down`. Arguments go to `netagent lab up`, e.g.
#   bash scripts/lab.sh --backend hybrid --nodes 4 --pods-per-node 3   (as root)
#   bash scripts/lab.sh --scenario kubernetes    (a real Kubernetes; the first run builds it)
# Nothing in the root network namespace is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
[ "$(id -u)" = 0 ] || { echo "run as root: the lab creates network namespaces"; exit 1; }

echo "building ./bin/netagent, ./bin/netagent-etcd, ./bin/netagent-cni and ./bin/netagent-wireguard"
mkdir -p bin
export CGO_ENABLED=0 # static: the Kubernetes scenario puts them into an image
go build -trimpath -o bin/netagent-cni ./cmd/cni-plugin
go build -trimpath -o bin/netagent ./cmd/netagent
go build -trimpath -o bin/netagent-etcd ./cmd/netagent-etcd
go build -trimpath -o bin/netagent-wireguard ./cmd/netagent-wireguard
extra=()
if [[ " $* " == *" kubernetes "* || " $* " == *"--scenario=kubernetes"* ]]; then
	# The loopback plugin containerd calls for every pod, and Kubernetes itself (cached).
	go build -trimpath -o bin/loopback github.com/containernetworking/plugins/plugins/main/loopback
	extra=(--kube-bin "$(bash scripts/k8s-build.sh)")
fi
if [ -e /run/netagent-lab/lab.json ]; then
	echo "a lab is already up: taking it down first"
	./bin/netagent lab down
fi
exec ./bin/netagent lab up "${extra[@]}" "$@"
