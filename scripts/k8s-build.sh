#!/usr/bin/env bash
# Builds the Kubernetes binaries the lab's kubernetes scenario and its tests run
# (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl)
# from the k8s.io/kubernetes module on the Go module proxy, and caches them outside the
# checkout, keyed by release, so only the first run pays (tens of minutes on 2 cores).
#
# The module's go.mod points the k8s.io/* staging modules at ./staging/..., which the
# published module does not contain; the build uses a copy whose go.mod points them at the
# served k8s.io/* modules of the same release (v0.X.Y for v1.X.Y), with GOWORK=off.
#
# Prints the binary directory on its last line. K8S_VERSION and NETAGENT_K8S_CACHE override
# the release and the cache root.
set -euo pipefail
version=${K8S_VERSION:-1.34.4}
root=${NETAGENT_K8S_CACHE:-/var/cache/netagent/kubernetes}
dir="$root/v$version"
bin="$dir/bin"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

have_all() {
	local b
	for b in "${bins[@]}"; do [ -x "$bin/$b" ] || return 1; done
	[ -f "$bin/.complete" ]
}
if have_all; then
	echo "kubernetes v$version: cached in $bin" >&2
	echo "$bin"
	exit 0
fi

export PATH="$PATH:/usr/local/go/bin"
start=$(date +%s)
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9 # a second build of the same release waits for the first, then finds it cached
if have_all; then echo "$bin"; exit 0; fi

echo "kubernetes v$version: fetching k8s.io/kubernetes from the Go module proxy" >&2
moddir=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@v$version" |
	sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -d "$moddir" ] || { echo "k8s.io/kubernetes@v$version: module not downloaded" >&2; exit 1; }

src="$dir/src"
rm -rf "$src" "$bin"
cp -r "$moddir" "$src"
chmod -R u+w "$src"
staging="v0.${version#1.}"
# k8s.io/foo => ./staging/src/k8s.io/foo  becomes  k8s.io/foo => k8s.io/foo v0.X.Y
sed -i -E "s#^(\s*)(k8s\.io/[^ ]+) => \./staging/src/k8s\.io/[^ ]+\s*\$#\1\2 => \2 $staging#" "$src/go.mod"
if grep -q '=> ./staging' "$src/go.mod"; then
	echo "go.mod still points at ./staging after the rewrite:" >&2
	grep '=> ./staging' "$src/go.mod" >&2
	exit 1
fi

echo "kubernetes v$version: building ${bins[*]} (the first build takes tens of minutes)" >&2
ver="v$version"
major=${version%%.*}
minor=${version#*.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$ver -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
mkdir -p "$bin.tmp"
(
	cd "$src"
	GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$bin.tmp/" \
		$(printf './cmd/%s ' "${bins[@]}")
)
touch "$bin.tmp/.complete"
mv "$bin.tmp" "$bin"
rm -rf "$src"
echo "kubernetes v$version: built in $(($(date +%s) - start)) s into $bin" >&2
echo "$bin"
