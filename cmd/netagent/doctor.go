package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/netagent/netagent/pkg/doctor"
	"github.com/netagent/netagent/pkg/subnetfile"
)

func cmdDoctor(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	o := doctor.Options{}
	fs.StringVar(&o.SubnetFile, "subnet-file", subnetfile.DefaultPath, "the agent's subnet file")
	fs.StringVar(&o.CNIConfDir, "cni-conf-dir", "/etc/cni/net.d", "CNI config directory (empty: skip)")
	fs.StringVar(&o.CNIBinDir, "cni-bin-dir", "/opt/cni/bin", "CNI binary directory (empty: skip)")
	fs.StringVar(&o.Bridge, "bridge", "cni0", "pod bridge")
	fs.StringVar(&o.Underlay, "iface", "", "underlay interface (default: the default route's)")
	fs.BoolVar(&o.RouteMode, "route-mode", false, "a Docker host running netagent route-mode (default: what the agent's status says)")
	addr := fs.String("addr", "127.0.0.1:9476", "the agent's --listen address")
	if err := parse(fs, args); err != nil {
		return err
	}
	c := &http.Client{Timeout: 3 * time.Second}
	if resp, err := c.Get("http://" + *addr + "/status"); err == nil {
		o.Status, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	var st struct {
		Docker string `json:"docker"`
	}
	if json.Unmarshal(o.Status, &st) == nil && st.Docker != "" {
		o.RouteMode = true
	}
	if o.RouteMode && !set(fs, "bridge") {
		o.Bridge = "docker0"
		if strings.HasPrefix(st.Docker, "network ") {
			o.Bridge = "" // a user-defined network's bridge is br-<id>: not checked
		}
	}
	findings := doctor.Run(o)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	problems := 0
	for _, f := range findings {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Severity, f.Check, f.What)
		if f.Fix != "" {
			fmt.Fprintf(tw, "\t\tfix: %s\n", f.Fix)
		}
		if f.Severity == doctor.Problem {
			problems++
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if problems > 0 {
		return errors.New(fmt.Sprint(problems, " problem(s) found"))
	}
	return nil
}

// set reports whether flag name was given on the command line.
func set(fs *flag.FlagSet, name string) bool {
	found := false
	fs.Visit(func(f *flag.Flag) { found = found || f.Name == name })
	return found
}
