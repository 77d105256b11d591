package wireguard

import (
	"fmt"
	"net/netip"
	"time"
)

// PeerStats is one peer's counters, for metrics and status.
type PeerStats struct {
	PublicKey     string
	Endpoint      netip.AddrPort // where its packets last came from (WireGuard roams)
	LastHandshake time.Time      // zero: never
	RxBytes       int64
	TxBytes       int64
}

// Stats reads every peer's counters from device name.
func Stats(c Client, name string) ([]PeerStats, error) {
	d, err := c.Device(name)
	if err != nil {
		return nil, fmt.Errorf("read device %s: %w", name, err)
	}
	out := make([]PeerStats, 0, len(d.Peers))
	for _, p := range d.Peers {
		out = append(out, PeerStats{
			PublicKey:     p.PublicKey.String(),
			Endpoint:      endpoint(p.Endpoint),
			LastHandshake: p.LastHandshakeTime,
			RxBytes:       p.ReceiveBytes,
			TxBytes:       p.TransmitBytes,
		})
	}
	return out, nil
}
