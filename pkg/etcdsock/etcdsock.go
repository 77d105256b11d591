// Package etcdsock names the unix sockets of netagent's embedded etcd members, shared by
// the server (pkg/embedetcd, in netagent-etcd) and its clients (the lab) without pulling
// the etcd server into the clients. etcd takes a unix URL's host part as a path relative
// to its working directory, so all members of a cluster share one directory.
package etcdsock

import "path/filepath"

// PeerURL is member name's peer URL.
func PeerURL(name string) string { return "unix://" + name + "-peer.sock:2380" }

// ClientURL is member name's client URL, relative to the members' directory.
func ClientURL(name string) string { return "unix://" + name + ".sock:2379" }

// ClientEndpoint is member name's client URL for clients in any directory.
func ClientEndpoint(dir, name string) string {
	return "unix://" + filepath.Join(dir, name+".sock:2379")
}
