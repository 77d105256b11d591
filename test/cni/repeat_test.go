package cni_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/netagent/netagent/pkg/bridge"
)

// TestRepeatedAddOnLivePod: a second ADD of a live attachment (same container ID and
// ifname, no DEL between) is refused with the spec's "already exists" error and leaves the
// pod alone: same interface index, same host veth, and a TCP connection and a 10 ms ping to
// the gateway that run through the refused ADD lose nothing.
func TestRepeatedAddOnLivePod(t *testing.T) {
	n := newNode(t)
	l := n.list("1.1.0", conf{"subnet": "10.244.13.0/24"})
	p := n.newPod("live")
	ip := podIP(t, n.mustAdd(l, p))
	indexes := func() (pod, host int) {
		t.Helper()
		ph, err := p.ns.Handle()
		if err != nil {
			t.Fatal(err)
		}
		defer ph.Close()
		nh, err := n.ns.Handle()
		if err != nil {
			t.Fatal(err)
		}
		defer nh.Close()
		pl, err := ph.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		hl, err := nh.LinkByName(bridge.HostVethName("live", "eth0"))
		if err != nil {
			t.Fatal(err)
		}
		return pl.Attrs().Index, hl.Attrs().Index
	}
	podIdx, hostIdx := indexes()

	// A TCP connection from the node to the pod, echoing lines.
	var ln net.Listener
	if err := p.ns.Do(func() error {
		var err error
		ln, err = net.Listen("tcp4", ip+":7000")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		s := bufio.NewScanner(c)
		for s.Scan() {
			fmt.Fprintln(c, s.Text())
		}
	}()
	var conn net.Conn
	if err := n.ns.Do(func() error {
		var err error
		conn, err = net.DialTimeout("tcp4", ip+":7000", 3*time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	echo := func(msg string) error {
		_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := fmt.Fprintln(conn, msg); err != nil {
			return err
		}
		got, err := bufio.NewReader(conn).ReadString('\n')
		if err != nil {
			return err
		}
		if strings.TrimSpace(got) != msg {
			return fmt.Errorf("echo %q, sent %q", got, msg)
		}
		return nil
	}
	if err := echo("before"); err != nil {
		t.Fatal(err)
	}

	// 10 ms pings to the gateway for 1.5 s, the repeated ADD in their middle.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	pinger := p.ns.Command(ctx, "ping", "-i", "0.01", "-c", "150", "-W", "1", "-q", "10.244.13.1")
	var pingOut strings.Builder
	pinger.Stdout, pinger.Stderr = &pingOut, &pingOut
	if err := pinger.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond)
	_, err := n.add(l, p)
	if err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("repeated ADD of a live pod = %v, want an 'already exists' error", err)
	}
	waitErr := pinger.Wait()
	if lost := pingLoss(pingOut.String()); lost != 0 || waitErr != nil {
		t.Errorf("pings lost across the repeated ADD: %d (%v): %s", lost, waitErr, pingOut.String())
	}
	if err := echo("after"); err != nil {
		t.Errorf("TCP connection after the repeated ADD: %v", err)
	}
	if pi, hi := indexes(); pi != podIdx || hi != hostIdx {
		t.Errorf("interface indexes after the repeated ADD: pod %d host %d, want %d %d (rebuilt)", pi, hi, podIdx, hostIdx)
	}
	if err := n.check(l, p); err != nil {
		t.Errorf("CHECK after the refused ADD: %v", err)
	}
	if a := n.allocations(); len(a) != 1 || a[0] != ip {
		t.Errorf("records after the refused ADD = %v, want [%s]", a, ip)
	}
	if err := n.del(l, p); err != nil {
		t.Fatal(err)
	}
}

var pingStats = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

// pingLoss is how many pings ping's summary says were lost, -1 without a summary.
func pingLoss(out string) int {
	m := pingStats.FindStringSubmatch(out)
	if m == nil {
		return -1
	}
	tx, _ := strconv.Atoi(m[1])
	rx, _ := strconv.Atoi(m[2])
	return tx - rx
}
