package cni_test

import (
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
)

// TestBurstOnNewBridgeIsUsable: when ADD returns, the pod's path works. Each round starts
// a node without a bridge and runs 64 ADDs at once; each pod pings its gateway right after
// its own ADD returns, with a 1 s timeout (a first ARP request that is dropped is not
// retried within it). No ping may fail. BURST_ROUNDS=<n> runs more rounds.
func TestBurstOnNewBridgeIsUsable(t *testing.T) {
	rounds := 2
	if s := os.Getenv("BURST_ROUNDS"); s != "" {
		var err error
		if rounds, err = strconv.Atoi(s); err != nil {
			t.Fatalf("BURST_ROUNDS=%q: %v", s, err)
		}
	}
	const pods = 64
	var failed, total atomic.Int64
	for r := range rounds {
		t.Run(fmt.Sprint("round", r), func(t *testing.T) {
			n := newNode(t)
			l := n.list("1.1.0", conf{"subnet": "10.244.14.0/24"})
			ps := make([]*pod, pods)
			for i := range ps {
				ps[i] = n.newPod(fmt.Sprintf("burst%02d", i))
			}
			var wg sync.WaitGroup
			for _, p := range ps {
				wg.Go(func() {
					if _, err := n.add(l, p); err != nil {
						t.Errorf("ADD %s: %v", p.rt.ContainerID, err)
						return
					}
					total.Add(1)
					if _, err := p.ns.Run("ping", "-c", "1", "-W", "1", "-q", "10.244.14.1"); err != nil {
						failed.Add(1)
						t.Errorf("%s cannot ping its gateway right after its ADD returned", p.rt.ContainerID)
					}
				})
			}
			wg.Wait()
			for _, p := range ps {
				if err := n.del(l, p); err != nil {
					t.Errorf("DEL %s: %v", p.rt.ContainerID, err)
				}
			}
		})
	}
	t.Logf("%d of %d pods could not ping their gateway right after ADD (%d rounds)", failed.Load(), total.Load(), rounds)
}
