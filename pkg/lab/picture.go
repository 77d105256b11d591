package lab

import (
	"encoding/json"
	"fmt"
	"html"
	"strings"
)

// peerView is what the picture needs of a node's /status.
type peerView struct {
	Subnet string `json:"subnet"`
	PodMTU int    `json:"podMTU"`
	Peers  []struct {
		Node string `json:"node"`
		Mode string `json:"mode"`
	} `json:"peers"`
}

// Picture draws the lab as SVG: the underlay switches (and the router between them),
// each node with its address and leased subnet, its pods below it, and between every two
// nodes how they reach each other — a solid line for direct routes, a dashed one for a
// VXLAN tunnel, a red dotted one for unreachable.
func (l *Lab) Picture() ([]byte, error) {
	views := map[string]peerView{}
	for _, n := range l.Nodes {
		code, b, err := l.Get(n, "/status")
		if err != nil || code != 200 {
			return nil, fmt.Errorf("status of %s: %d %v", n.Name, code, err)
		}
		var v peerView
		if err := json.Unmarshal(b, &v); err != nil {
			return nil, err
		}
		views[n.Name] = v
	}
	const (
		colW, nodeW, nodeH = 265, 235, 64
		top, switchY       = 40, 90
		nodeY              = 250
	)
	maxPods := 0
	for _, n := range l.Nodes {
		maxPods = max(maxPods, len(n.Pods))
	}
	width := 60 + colW*len(l.Nodes)
	if l.Backend == "wireguard" {
		width = max(width, 720) // room for the legend's fourth entry
	}
	height := nodeY + nodeH + 40 + 34*maxPods + 90
	var b strings.Builder
	e := html.EscapeString
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="13">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="#ffffff"/>`+"\n")
	fmt.Fprintf(&b, `<text x="30" y="%d" font-size="17" font-weight="bold">netagent lab: %d nodes, backend %s%s</text>`+"\n", top-10, len(l.Nodes), e(l.Backend), map[bool]string{true: " (Docker hosts, route mode)"}[l.RouteMode])
	x := func(i int) int { return 40 + colW*i + nodeW/2 }
	// Underlay switches: one bar per underlay prefix.
	type bar struct {
		net      string
		from, to int
	}
	var bars []bar
	for i, n := range l.Nodes {
		if len(bars) == 0 || bars[len(bars)-1].net != n.Net.String() {
			bars = append(bars, bar{n.Net.String(), i, i})
		}
		bars[len(bars)-1].to = i
	}
	for bi, br := range bars {
		x1, x2 := x(br.from)-nodeW/2, x(br.to)+nodeW/2
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="22" rx="4" fill="#e8eef7" stroke="#5b7db1"/>`+"\n", x1, switchY, x2-x1)
		label := "switch " + br.net
		if bi == 0 {
			label += fmt.Sprintf("  ·  outside host %s", l.Ext)
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" fill="#2c4a7a">%s</text>`+"\n", x1+8, switchY+16, e(label))
		if bi > 0 {
			prev := bars[bi-1]
			rx := (x(prev.to) + x(br.from)) / 2
			fmt.Fprintf(&b, `<rect x="%d" y="%d" width="70" height="24" rx="4" fill="#fff4e0" stroke="#b07a22"/><text x="%d" y="%d" fill="#7a5312">router</text>`+"\n", rx-35, switchY-40, rx-20, switchY-23)
			fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#b07a22"/><line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#b07a22"/>`+"\n",
				rx-35, switchY-28, x(prev.to)+nodeW/2-10, switchY, rx+35, switchY-28, x(br.from)-nodeW/2+10, switchY)
		}
	}
	// Peer paths between nodes, drawn as arcs between the switch and the nodes.
	idx := map[string]int{}
	for i, n := range l.Nodes {
		idx[n.Name] = i
	}
	arc := 0
	for i, n := range l.Nodes {
		for _, p := range views[n.Name].Peers {
			j, ok := idx[p.Node]
			if !ok || j <= i {
				continue
			}
			style := `stroke="#2e7d32" stroke-width="2"`
			switch p.Mode {
			case "vxlan":
				style = `stroke="#6a1b9a" stroke-width="2" stroke-dasharray="7,4"`
			case "wireguard":
				style = `stroke="#1565c0" stroke-width="3" stroke-dasharray="12,3"`
			case "unreachable":
				style = `stroke="#c62828" stroke-width="2" stroke-dasharray="2,4"`
			}
			y := switchY + 50 + 16*(arc%5)
			arc++
			fmt.Fprintf(&b, `<path d="M %d %d C %d %d, %d %d, %d %d" fill="none" %s/>`+"\n", x(i), nodeY, x(i), y, x(j), y, x(j), nodeY, style)
		}
	}
	// Nodes and their pods.
	for i, n := range l.Nodes {
		v := views[n.Name]
		nx := x(i) - nodeW/2
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#5b7db1"/>`+"\n", x(i), switchY+22, x(i), nodeY)
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" rx="6" fill="#f1f8e9" stroke="#558b2f" stroke-width="1.5"/>`+"\n", nx, nodeY, nodeW, nodeH)
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-weight="bold">%s</text>`+"\n", nx+10, nodeY+20, e(n.Name))
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s</text>`+"\n", nx+10, nodeY+38, e("eth0 "+n.IP.String()))
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s</text>`+"\n", nx+10, nodeY+55, e(fmt.Sprintf("pods %s (MTU %d)", v.Subnet, v.PodMTU)))
		if len(n.Pods) > 0 { // one line behind all pods: the bridge
			fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#999"/>`+"\n", x(i), nodeY+nodeH, x(i), nodeY+nodeH+20+34*(len(n.Pods)-1))
		}
		for k, p := range n.Pods {
			py := nodeY + nodeH + 20 + 34*k
			fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="26" rx="13" fill="#fffde7" stroke="#f9a825"/>`+"\n", nx+12, py, nodeW-24)
			fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="12">%s</text>`+"\n", nx+24, py+17, e(p.Name+"  "+p.IP.String()))
		}
	}
	ly := height - 30
	fmt.Fprintf(&b, `<line x1="30" y1="%d" x2="70" y2="%d" stroke="#2e7d32" stroke-width="2"/><text x="76" y="%d">direct route</text>`+"\n", ly, ly, ly+4)
	fmt.Fprintf(&b, `<line x1="190" y1="%d" x2="230" y2="%d" stroke="#6a1b9a" stroke-width="2" stroke-dasharray="7,4"/><text x="236" y="%d">VXLAN tunnel</text>`+"\n", ly, ly, ly+4)
	fmt.Fprintf(&b, `<line x1="350" y1="%d" x2="390" y2="%d" stroke="#c62828" stroke-width="2" stroke-dasharray="2,4"/><text x="396" y="%d">unreachable</text>`+"\n", ly, ly, ly+4)
	if l.Backend == "wireguard" {
		fmt.Fprintf(&b, `<line x1="500" y1="%d" x2="540" y2="%d" stroke="#1565c0" stroke-width="3" stroke-dasharray="12,3"/><text x="546" y="%d">WireGuard (encrypted)</text>`+"\n", ly, ly, ly+4)
	}
	b.WriteString("</svg>\n")
	return []byte(b.String()), nil
}
