package wireguard_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"time"

	"github.com/netagent/netagent/pkg/wireguard"
	"github.com/netagent/netagent/pkg/wireguard/device"
	"github.com/netagent/netagent/pkg/wireguard/key"
	"github.com/vishvananda/netlink"
	vns "github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/wgctrl"
)

// helperEnv makes the test binary act as a configuring agent (see helperMain).
const helperEnv = "NETAGENT_WG_TEST_AGENT"

// agentJob is what the stand-in agent is told to configure.
type agentJob struct {
	NetNS, Dev, Bin, Log, KeyDir string
	Subnet                       string
	Peers                        []wireguard.PeerSpec
}

// helperMain is a stand-in for the agent in its own process: it starts the node's daemon
// through the reconciler, configures it, says "ready" and waits to be killed, so a test can
// check that the tunnel outlives the process that set it up.
func helperMain() int {
	var job agentJob
	if err := json.Unmarshal([]byte(os.Getenv(helperEnv)), &job); err != nil {
		fmt.Fprintln(os.Stderr, "agent job:", err)
		return 2
	}
	if err := configure(job); err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		return 1
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, bufio.NewReader(os.Stdin)) // until killed
	return 0
}

func configure(job agentJob) error {
	fd, err := vns.GetFromPath(job.NetNS)
	if err != nil {
		return err
	}
	defer fd.Close()
	h, err := netlink.NewHandleAt(fd)
	if err != nil {
		return err
	}
	defer h.Close()
	wg, err := wgctrl.New()
	if err != nil {
		return err
	}
	defer wg.Close()
	priv, _, err := key.LoadOrCreate(job.KeyDir)
	if err != nil {
		return err
	}
	peers, err := wireguard.Peers(wireguard.Self{PublicKey: priv.PublicKey(), Network: netip.MustParsePrefix(network), Subnet: netip.MustParsePrefix(job.Subnet)}, job.Peers)
	if err != nil {
		return err
	}
	rec := &wireguard.Reconciler{Client: wg, Links: h, Device: &device.Daemon{Binary: job.Bin, Name: job.Dev, MTU: mtu, NetNS: job.NetNS, LogPath: job.Log}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = rec.Set(ctx, wireguard.Config{Name: job.Dev, PrivateKey: priv, ListenPort: port, MTU: mtu, Peers: peers})
	return err
}
