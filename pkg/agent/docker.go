package agent

import "github.com/netagent/netagent/pkg/bridge"

// enableForwarding turns on IPv4 forwarding, except on a Docker host: there dockerd turns
// it on, and sets the FORWARD policy to DROP when it is the one doing so, which is what
// keeps unpublished container ports closed to the underlay. Turning it on before dockerd
// starts would leave that policy ACCEPT.
func (a *Agent) enableForwarding() error {
	if a.opt.Docker != nil {
		return nil
	}
	return bridge.EnableForwarding()
}
