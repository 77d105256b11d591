# The netagent image: the agent (netagent), the CNI plugin (netagent-cni) and the userspace
# WireGuard daemon (netagent-wireguard, its own container in manifests/wireguard) with
# Debian's iptables. The DaemonSet in manifests/ runs `netagent run`; its init container runs
# `netagent install-cni`, which copies /usr/local/bin/netagent-cni onto the node.
#
#   docker build -t REGISTRY/netagent:TAG . && docker push REGISTRY/netagent:TAG
#
# The root file system is assembled by scripts/image-rootfs.sh (Debian's iptables and what it
# depends on, unpacked with dpkg-deb, plus the two static binaries) on no base image: the
# Kubernetes lab builds its image with the same script on a machine that pulls nothing, so
# the image the lab tests and the one built here hold the same files.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ENV CGO_ENABLED=0
RUN go build -trimpath -ldflags="-s -w" -o /out/netagent ./cmd/netagent && \
    go build -trimpath -ldflags="-s -w" -o /out/netagent-cni ./cmd/cni-plugin && \
    go build -trimpath -ldflags="-s -w" -o /out/netagent-wireguard ./cmd/netagent-wireguard

FROM debian:bookworm-slim AS assemble
RUN apt-get update
COPY scripts/image-rootfs.sh /image-rootfs.sh
COPY --from=build /out/ /out/
RUN bash /image-rootfs.sh /rootfs /out/netagent /out/netagent-cni /debs

FROM scratch
COPY --from=assemble /rootfs/ /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Netlink and iptables need root (the DaemonSet grants NET_ADMIN and NET_RAW only). On a
# node whose other iptables users (kube-proxy) use the legacy backend, point the iptables
# links in /usr/sbin at the -legacy binaries in a derived image (`netagent doctor` on the
# node reports a legacy/nf_tables split).
USER root
ENTRYPOINT ["/usr/local/bin/netagent"]
