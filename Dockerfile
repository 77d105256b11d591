# The netagent image: the agent (netagent) and the CNI plugin (netagent-cni) on Debian with
# iptables. The DaemonSet in manifests/ runs `netagent run`; its init container runs
# `netagent install-cni`, which copies /usr/local/bin/netagent-cni onto the node.
#
#   docker build -t ghcr.io/netagent/netagent:0.1.0 .
#
# Not built or tested where this was written: that machine cannot pull base images. The
# manifests are tested (go test ./cmd/netagent ./manifests/...); this file is not.

FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ENV CGO_ENABLED=0
RUN go build -trimpath -ldflags="-s -w" -o /out/netagent ./cmd/netagent && \
    go build -trimpath -ldflags="-s -w" -o /out/netagent-cni ./cmd/cni-plugin

FROM debian:bookworm-slim
# iptables brings iptables-nft and iptables-legacy; the agent runs whichever `iptables`
# the alternatives select, which on bookworm is nf_tables. Its rules must live where the
# node's other iptables users (kube-proxy) put theirs: on a node that uses legacy
# iptables, build a derived image with
#   RUN update-alternatives --set iptables /usr/sbin/iptables-legacy
# (`netagent doctor` on the node reports a legacy/nf_tables split).
RUN apt-get update && \
    apt-get install -y --no-install-recommends iptables && \
    rm -rf /var/lib/apt/lists/*
COPY --from=build /out/netagent /out/netagent-cni /usr/local/bin/
# Netlink and iptables need root (the DaemonSet grants NET_ADMIN and NET_RAW only).
USER root
ENTRYPOINT ["/usr/local/bin/netagent"]
