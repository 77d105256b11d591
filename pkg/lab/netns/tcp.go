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
	var ln net.Listener
	if err := n.Do(func() error {
		var err error
		ln, err = net.Listen("tcp4", fmt.Sprintf(":%d", port))
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
func (n *NS) Fetch(addr string) (string, error) {
	var conn net.Conn
	if err := n.Do(func() error {
		var err error
		conn, err = net.DialTimeout("tcp4", addr, 3*time.Second)
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
