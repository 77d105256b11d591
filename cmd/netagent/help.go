package main

import (
	"errors"
	"flag"
	"fmt"
	"slices"
	"strings"
)

// Help. The standard flag package parses (it takes -flag and --flag alike); what it
// prints is replaced: a command's -h shows what the command does and only its own flags,
// in groups, on stdout with exit status 0.

// helpGroup is a titled group of a command's flags, in the order listed.
type helpGroup struct {
	title string
	names []string
}

// about is what each command's help says above its flags and how its flags are grouped.
var about = map[*flag.FlagSet]struct {
	text   string
	groups []helpGroup
}{}

// describe sets fs's help text (what the command does and how to call it).
func describe(fs *flag.FlagSet, text string) {
	a := about[fs]
	a.text = text
	about[fs] = a
}

// group adds a group of flags (already registered on fs) to fs's help.
func group(fs *flag.FlagSet, title string, names ...string) {
	a := about[fs]
	a.groups = append(a.groups, helpGroup{title, names})
	about[fs] = a
}

// helpShown is the result of -h: the help text, for stdout.
type helpShown struct{ text string }

func (h *helpShown) Error() string { return "help requested" }

// help renders fs's help: its text, then its flags by group (ungrouped ones last, under
// "Other").
func help(fs *flag.FlagSet) string {
	var b strings.Builder
	a := about[fs]
	if a.text != "" {
		fmt.Fprintf(&b, "%s\n", strings.TrimRight(a.text, "\n"))
	} else {
		fmt.Fprintf(&b, "usage: netagent %s [flags]\n", fs.Name())
	}
	seen := map[string]bool{}
	groups := slices.Clone(a.groups)
	var rest []string
	fs.VisitAll(func(f *flag.Flag) {
		for _, g := range groups {
			if slices.Contains(g.names, f.Name) {
				return
			}
		}
		rest = append(rest, f.Name)
	})
	if len(rest) > 0 {
		title := "Flags"
		if len(groups) > 0 {
			title = "Other"
		}
		groups = append(groups, helpGroup{title, rest})
	}
	for _, g := range groups {
		fmt.Fprintf(&b, "\n%s:\n", g.title)
		for _, name := range g.names {
			f := fs.Lookup(name)
			if f == nil || seen[name] {
				continue
			}
			seen[name] = true
			arg, usage := flag.UnquoteUsage(f)
			fmt.Fprintf(&b, "  --%s %s\n        %s", f.Name, arg, usage)
			if f.DefValue != "" && f.DefValue != "0" && f.DefValue != "false" && f.DefValue != "0s" {
				fmt.Fprintf(&b, " (default %s)", f.DefValue)
			}
			b.WriteString("\n")
		}
	}
	b.WriteString("\nEvery flag can also be set as NETAGENT_<FLAG> (upper case, dashes as underscores); the command line wins.\n")
	return strings.ReplaceAll(b.String(), " \n", "\n")
}

// parseError turns a parse failure into an error that says where the flags are listed,
// and -h into helpShown.
func parseError(fs *flag.FlagSet, err error) error {
	if errors.Is(err, flag.ErrHelp) {
		return &helpShown{help(fs)}
	}
	return fmt.Errorf("%w (netagent %s -h lists its flags)", err, fs.Name())
}

// isHelp reports whether a command word asks for help.
func isHelp(arg string) bool { return arg == "-h" || arg == "--help" || arg == "help" }
