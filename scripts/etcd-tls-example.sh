#!/usr/bin/env bash
# Generates a small PKI for etcd with client-certificate authentication, as documented in
# docs/etcd-tls.md: a CA, a server certificate for etcd's addresses and a client
# certificate for the agents. The test suite (test/cluster, TestEtcdTLS) uses exactly this
# script, so the documented example is the tested one.
#
#   scripts/etcd-tls-example.sh DIR SERVER-ADDRESS...
#
# SERVER-ADDRESS: IPs or DNS names etcd is reached at (each member's), e.g.
#   scripts/etcd-tls-example.sh /etc/netagent/pki 10.0.0.11 10.0.0.12 10.0.0.13 etcd.example.internal
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DIR SERVER-ADDRESS..." >&2; exit 2; }
dir=$1; shift
mkdir -p "$dir"
chmod 700 "$dir"
cd "$dir"
umask 077 # keys are readable by their owner only

san=""
for a in "$@"; do
	if [[ $a =~ ^[0-9.]+$ || $a == *:* ]]; then san+="IP:$a,"; else san+="DNS:$a,"; fi
done
san=${san%,}

# The CA (keep ca.key offline once the certificates are issued).
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
	-subj "/CN=netagent etcd CA" -keyout ca.key -out ca.crt 2>/dev/null

issue() { # name CN extendedKeyUsage [SAN]
	local name=$1 cn=$2 eku=$3 alt=${4:-}
	openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
		-subj "/CN=$cn" -keyout "$name.key" -out "$name.csr" 2>/dev/null
	{
		echo "basicConstraints=CA:FALSE"
		echo "keyUsage=digitalSignature,keyEncipherment"
		echo "extendedKeyUsage=$eku"
		[ -z "$alt" ] || echo "subjectAltName=$alt"
	} >"$name.ext"
	openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
		-extfile "$name.ext" -out "$name.crt" 2>/dev/null
	rm -f "$name.csr" "$name.ext"
}
# etcd presents server.crt to clients (and, with the same flags, to its peers).
issue server etcd serverAuth,clientAuth "$san"
# Every agent presents client.crt; etcd accepts it because ca.crt signed it.
issue client netagent clientAuth
chmod 644 ca.crt server.crt client.crt
rm -f ca.srl
echo "wrote $dir/{ca.crt,ca.key,server.crt,server.key,client.crt,client.key}"
