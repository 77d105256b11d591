package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// addResult is what a successful ADD reports.
type addResult struct {
	cniVersion            string
	bridge, bridgeMAC     string // none for a routed pod
	hostVeth, hostMAC     string
	ifName, podMAC, netns string
	addrs                 []ifAddr // IPv4 first
	defaultRoute          bool
	dns                   types.DNS
}

// print writes the result to stdout. For the 1.x result format without DNS (the common
// case) it writes the JSON directly: in a process that lives for one call, the library's
// reflective encoder costs a measurable share of ADD. Everything else goes through the
// library, and a test keeps the two byte-for-byte equivalent in meaning.
func (r addResult) print() error {
	if (r.cniVersion == "1.0.0" || r.cniVersion == "1.1.0") && r.dns.IsEmpty() {
		_, err := os.Stdout.Write(r.json())
		return err
	}
	return types.PrintResult(r.library(), r.cniVersion)
}

func (r addResult) library() *current.Result {
	res := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: r.bridge, Mac: r.bridgeMAC},
			{Name: r.hostVeth, Mac: r.hostMAC},
			{Name: r.ifName, Mac: r.podMAC, Sandbox: r.netns},
		},
		DNS: r.dns,
	}
	if r.bridge == "" { // a routed pod
		res.Interfaces = res.Interfaces[1:]
	}
	for _, a := range r.addrs {
		bits := a.addr.Addr().BitLen()
		res.IPs = append(res.IPs, &current.IPConfig{
			Interface: current.Int(len(res.Interfaces) - 1),
			Address:   net.IPNet{IP: a.addr.Addr().AsSlice(), Mask: net.CIDRMask(a.addr.Bits(), bits)},
			Gateway:   a.gw.AsSlice(),
		})
		if r.defaultRoute {
			res.Routes = append(res.Routes, &types.Route{Dst: net.IPNet{IP: make(net.IP, bits/8), Mask: net.CIDRMask(0, bits)}, GW: a.gw.AsSlice()})
		}
	}
	return res
}

func (r addResult) json() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, `{"cniVersion":%s,"interfaces":[`, q(r.cniVersion))
	pod := 1
	if r.bridge != "" {
		fmt.Fprintf(&b, `{"name":%s,"mac":%s},`, q(r.bridge), q(r.bridgeMAC))
		pod = 2
	}
	fmt.Fprintf(&b, `{"name":%s,"mac":%s},{"name":%s,"mac":%s,"sandbox":%s}],`,
		q(r.hostVeth), q(r.hostMAC), q(r.ifName), q(r.podMAC), q(r.netns))
	b.WriteString(`"ips":[`)
	for i, a := range r.addrs {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"interface":%d,"address":%s,"gateway":%s}`, pod, q(a.addr.String()), q(a.gw.String()))
	}
	b.WriteByte(']')
	if r.defaultRoute {
		b.WriteString(`,"routes":[`)
		for i, a := range r.addrs {
			if i > 0 {
				b.WriteByte(',')
			}
			dst := "0.0.0.0/0"
			if a.gw.Is6() {
				dst = "::/0"
			}
			fmt.Fprintf(&b, `{"dst":%q,"gw":%s}`, dst, q(a.gw.String()))
		}
		b.WriteByte(']')
	}
	b.WriteString("}\n")
	return b.Bytes()
}

// q quotes s as a JSON string.
func q(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, c := range s {
		switch {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteRune(c)
		case c < 0x20 || c == 0x2028 || c == 0x2029:
			fmt.Fprintf(&b, `\u%04x`, c)
		default:
			b.WriteRune(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}
