// Command netagent is the node agent: `netagent run` leases this node's pod subnet from etcd
// and keeps routes, VXLAN and NAT in line with the other nodes' leases. Other subcommands
// manage the network config, show a node's state and clean up.
//
// Every flag can also be set from the environment as NETAGENT_<FLAG> (dashes become
// underscores), which is how the DaemonSet configures it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

type command struct {
	name  string
	short string
	run   func(ctx context.Context, args []string, stdout io.Writer) error
}

var commands = []command{
	{"run", "run the node agent", cmdRun},
	{"route-mode", "run the agent on a bare Docker host: Docker's bridge uses the leased subnet", cmdRouteMode},
	{"config", "get or set the network config in etcd (config get | config set ...)", cmdConfig},
	{"status", "show this node's lease and every peer's state (asks the running agent)", cmdStatus},
	{"leave", "release this node's subnet lease for good (node decommissioned)", cmdLeave},
	{"reserve", "pin a subnet to a node name", cmdReserve},
	{"cleanup", "remove netagent's kernel state and files from this node", cmdCleanup},
	{"install-cni", "copy the CNI plugin into the node's CNI binary directory, atomically (DaemonSet init container)", cmdInstallCNI},
	{"etcd", "run an embedded single-member etcd on a unix socket (labs, single machines)", cmdEtcd},
	{"doctor", "check this node for what usually breaks a container network, and say how to fix it", cmdDoctor},
	{"lab", "a multi-node cluster in network namespaces on this machine (lab up|status|check|down)", cmdLab},
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := dispatch(ctx, os.Args[1:], os.Stdout); err != nil {
		if ctx.Err() != nil && errors.Is(err, context.Canceled) {
			return // stopped by SIGTERM or ^C, also while still starting: a clean stop
		}
		if errors.Is(err, errNoCommand) {
			usage(os.Stderr)
			os.Exit(2)
		}
		fmt.Fprintln(os.Stderr, "netagent:", err)
		os.Exit(1)
	}
}

// errNoCommand: netagent was run without a command (usage goes to stderr, exit status 2).
var errNoCommand = errors.New("no command")

func dispatch(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return errNoCommand
	}
	if isHelp(args[0]) {
		usage(stdout)
		return nil
	}
	for _, c := range commands {
		if c.name == args[0] {
			err := c.run(ctx, args[1:], stdout)
			if h := (*helpShown)(nil); errors.As(err, &h) {
				_, err = fmt.Fprint(stdout, h.text)
			}
			return err
		}
	}
	return fmt.Errorf("unknown command %q (netagent -h lists them)", args[0])
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: netagent COMMAND [flags]")
	fmt.Fprintln(w)
	for _, c := range commands {
		fmt.Fprintf(w, "  %-12s %s\n", c.name, c.short)
	}
	fmt.Fprintln(w, "\nRun `netagent COMMAND -h` for a command's flags. Flags may be set as NETAGENT_<FLAG> environment variables.")
}

// parse parses args after applying NETAGENT_* environment defaults, so the command line
// wins over the environment.
func parse(fs *flag.FlagSet, args []string) error {
	known := map[string]bool{}
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		env := "NETAGENT_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		known[env] = true
		if v, ok := os.LookupEnv(env); ok {
			if err := fs.Set(f.Name, v); err != nil { // fs.Set: Visit sees it as given
				errs = append(errs, fmt.Errorf("%s=%q: %w", env, v, err))
			}
		}
	})
	if err := errors.Join(errs...); err != nil {
		return err
	}
	// The flag package would print its own usage (to stderr, every flag, "Usage of ...");
	// help.go renders ours.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	if err := fs.Parse(args); err != nil {
		return parseError(fs, err)
	}
	return nil
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}
