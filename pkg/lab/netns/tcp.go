package netns

import (
	"fmt"
	"net"
	"sync"
	"time"
)

// Serve listens on TCP port inside the namespace until the test ends and answers each
// connection with reply(client address), then closes it.
func (n *NS) Serve(t TB, port int, reply func(client string) string) {
	t.Helper()
	n.serve(t, "tcp4", port, reply)
}

// Serve6 is Serve over IPv6.
func (n *NS) Serve6(t TB, port int, reply func(client string) string) {
	t.Helper()
	n.serve(t, "tcp6", port, reply)
}

func (n *NS) serve(t TB, network string, port int, reply func(client string) string) {
	t.Helper()
	var ln net.Listener
	if err := n.Do(func() error {
		var err error
		ln, err = net.Listen(network, fmt.Sprintf(":%d", port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			_, _ = c.Write([]byte(reply(host)))
			_ = c.Close()
		}
	}()
}

// Fetch connects from inside the namespace to addr and returns what the server says.
func (n *NS) Fetch(addr string) (string, error) { return n.fetch("tcp4", addr) }

// Fetch6 is Fetch over IPv6 (addr as "[2001:db8::1]:80").
func (n *NS) Fetch6(addr string) (string, error) { return n.fetch("tcp6", addr) }

func (n *NS) fetch(network, addr string) (string, error) {
	var conn net.Conn
	if err := n.Do(func() error {
		var err error
		conn, err = net.DialTimeout(network, addr, 3*time.Second)
		return err
	}); err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	b := make([]byte, 256)
	k, err := conn.Read(b)
	if err != nil {
		return "", err
	}
	return string(b[:k]), nil
}
