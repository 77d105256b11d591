#!/usr/bin/env bash
# image-rootfs.sh OUT NETAGENT NETAGENT_CNI [DEB_CACHE]
#
# Assembles the netagent image's root file system in OUT: Debian's iptables (the nf_tables
# variant selected, as update-alternatives would on bookworm) with the packages it depends
# on, unpacked with dpkg-deb, plus the static binaries in /usr/local/bin (netagent-wireguard
# too when it lies next to NETAGENT). The Dockerfile
# runs this script in its assembly stage and the Kubernetes lab runs it on the node, so both
# images hold the same files; no base image is pulled.
set -euo pipefail
out=$1 agent=$2 cni=$3 cache=${4:-/var/cache/netagent/debs}
pkgs=(iptables)
mkdir -p "$cache"
# The dependency closure, as Debian resolves it (libc6, libxtables12, libnftnl11, ...).
closure() {
	apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
		--no-replaces --no-enhances "${pkgs[@]}" 2>/dev/null | grep -v '^ ' | grep -v '<' | sort -u
}
mapfile -t closure < <(closure)
if ((${#closure[@]} < 2)); then # no package lists yet
	apt-get update -qq
	mapfile -t closure < <(closure)
fi
((${#closure[@]} > 1)) || { echo "apt-cache cannot resolve ${pkgs[*]}" >&2; exit 1; }
(cd "$cache" && apt-get -o APT::Sandbox::User=root download "${closure[@]}" >/dev/null)
rm -rf "$out"
mkdir -p "$out"
for p in "${closure[@]}"; do
	deb=$(ls -t "$cache"/"${p}"_*.deb | head -n 1)
	dpkg-deb -x "$deb" "$out"
done
for t in iptables ip6tables; do
	ln -sf "$t-nft" "$out/usr/sbin/$t"
	ln -sf "$t-nft-save" "$out/usr/sbin/$t-save"
	ln -sf "$t-nft-restore" "$out/usr/sbin/$t-restore"
done
mkdir -p "$out/usr/local/bin" "$out/tmp" "$out/run" "$out/proc" "$out/sys" "$out/dev" "$out/var/lib" "$out/root"
chmod 1777 "$out/tmp"
install -m 0755 "$agent" "$out/usr/local/bin/netagent"
install -m 0755 "$cni" "$out/usr/local/bin/netagent-cni"
# The userspace WireGuard daemon, when built next to the agent (the Dockerfile does).
if [[ -e "$(dirname "$agent")/netagent-wireguard" ]]; then
	install -m 0755 "$(dirname "$agent")/netagent-wireguard" "$out/usr/local/bin/netagent-wireguard"
fi
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\n' > "$out/etc/passwd"
printf 'root:x:0:\n' > "$out/etc/group"
# The packages' documentation is not needed at run time.
rm -rf "$out/usr/share/doc" "$out/usr/share/man" "$out/usr/share/lintian"
