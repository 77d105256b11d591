// Command netagent-etcd is the embedded etcd of netagent (go.etcd.io/etcd/server/v3/embed)
// on unix sockets: one member for a single machine or a lab, or a member of a cluster. It
// is its own binary so that the node agent does not carry the etcd server: `netagent etcd`
// and `netagent run --embedded-etcd` start this one.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/netagent/netagent/pkg/embedetcd"
)

func main() {
	fs := flag.NewFlagSet("netagent-etcd", flag.ExitOnError)
	dir := fs.String("data-dir", "/run/netagent/etcd", "data directory; the client socket is DIR/etcd.sock:2379 (DIR/NAME.sock:2379 for a cluster member)")
	name := fs.String("name", "", "cluster member name (with --initial-cluster; default: a single member)")
	cluster := fs.String("initial-cluster", "", "members as NAME=unix://NAME-peer.sock:2380,... (all members share --data-dir)")
	_ = fs.Parse(os.Args[1:])
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var srv *embedetcd.Server
	var err error
	if *name != "" {
		srv, err = embedetcd.StartMember(embedetcd.Member{Name: *name, Dir: *dir, InitialCluster: *cluster})
	} else {
		srv, err = embedetcd.Start(*dir)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "netagent-etcd:", err)
		os.Exit(1)
	}
	fmt.Printf("etcd ready at %s\n", srv.Endpoint)
	<-ctx.Done()
	srv.Close()
}
