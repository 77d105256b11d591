#!/usr/bin/env bash
# Installs the Debian packages the tests and the lab need (only the missing ones), so the
# README's commands work on a fresh machine. Go itself comes with the machine.
set -euo pipefail
pkgs=(iproute2 iptables nftables openssl iputils-ping containerd runc busybox-static procps util-linux etcd-server docker.io iperf3)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "installing: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	# Install services without starting them: a dockerd or etcd started by the package in
	# the root network namespace would change it (the tests start their own in namespaces).
	added_policy=""
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && added_policy=1
	fi
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	[ -z "$added_policy" ] || rm -f /usr/sbin/policy-rc.d
fi
export PATH="$PATH:/usr/local/go/bin:/usr/sbin:/sbin"
command -v go >/dev/null || { echo "go is not installed (expected at /usr/local/go)"; exit 1; }
