// Package nlattr is netagent's one netlink attribute codec, for the raw nftables messages
// that no library call covers cheaply: the CNI plugin's anti-spoofing set (pkg/antispoof)
// and the agent's ruleset notifications. Framing is github.com/vishvananda/netlink/nl's
// (nl.RtAttr and nl.ParseRouteAttr), the netlink library both binaries link already; this
// adds what nftables needs on top: nested lists, flags masked off types, and parsing that
// never reads past a malformed or unpadded attribute.
//
// Why not github.com/mdlayher/netlink's AttributeEncoder/Decoder (go.mod has it, through
// google/nftables): the plugin does not link it, and every pod ADD and DEL would pay its
// package initialisation.
package nlattr

import (
	"bytes"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Attr is one attribute: a value, or (Nested != nil) a nested list. Read back, Type has no
// flags and Data holds a nested list's encoding.
type Attr struct {
	Type   uint16
	Data   []byte
	Nested []Attr
}

// String is a NUL-terminated string attribute.
func String(typ uint16, s string) Attr { return Attr{Type: typ, Data: []byte(s + "\x00")} }

// Bytes is an attribute holding b.
func Bytes(typ uint16, b []byte) Attr { return Attr{Type: typ, Data: b} }

// Nest is a nested list.
func Nest(typ uint16, kids ...Attr) Attr { return Attr{Type: typ, Nested: kids} }

func (a Attr) rtattr() *nl.RtAttr {
	if a.Nested == nil {
		return nl.NewRtAttr(int(a.Type), a.Data)
	}
	r := nl.NewRtAttr(int(a.Type|unix.NLA_F_NESTED), nil)
	for _, k := range a.Nested {
		r.AddChild(k.rtattr())
	}
	return r
}

// Append appends the encoding of as to b.
func Append(b []byte, as []Attr) []byte {
	for _, a := range as {
		b = append(b, a.rtattr().Serialize()...)
	}
	return b
}

// Parse reads the attributes in b, up to the first that is malformed or runs past the
// end of b.
func Parse(b []byte) []Attr {
	// nl.ParseRouteAttr steps over each attribute's padding; a final attribute without
	// its padding would make it step past the end, so pad b first, and drop what then
	// reads into the padding.
	end := len(b)
	if r := len(b) % unix.NLA_ALIGNTO; r != 0 {
		b = append(b[:len(b):len(b)], make([]byte, unix.NLA_ALIGNTO-r)...)
	}
	as, err := nl.ParseRouteAttr(b)
	if err != nil {
		return nil
	}
	out := make([]Attr, 0, len(as))
	off := 0
	for _, a := range as {
		if off+int(a.Attr.Len) > end {
			break
		}
		off += (int(a.Attr.Len) + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1)
		out = append(out, Attr{Type: a.Attr.Type &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER), Data: a.Value})
	}
	return out
}

// Get returns the data of the first attribute of type typ.
func Get(as []Attr, typ uint16) ([]byte, bool) {
	for _, a := range as {
		if a.Type == typ {
			return a.Data, true
		}
	}
	return nil, false
}

// Find returns the data of the first attribute of type typ in b, as Get(Parse(b), typ)
// does (nothing when an attribute before it is malformed), without allocating unless b
// lacks its final padding, which the kernel never leaves out: the agent reads tens of
// thousands of ruleset notifications at a cold start.
func Find(b []byte, typ uint16) ([]byte, bool) {
	end := len(b)
	if r := end % unix.NLA_ALIGNTO; r != 0 {
		b = append(b[:end:end], make([]byte, unix.NLA_ALIGNTO-r)...)
	}
	var found []byte
	ok := false
	for off := 0; len(b)-off >= unix.SizeofRtAttr; {
		n := int(nl.NativeEndian().Uint16(b[off:]))
		if n < unix.SizeofRtAttr || off+n > len(b) {
			return nil, false // Parse returns nothing for a malformed list
		}
		if off+n > end {
			break // reads into the padding (the last attribute, unpadded): dropped
		}
		if t := nl.NativeEndian().Uint16(b[off+2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER); !ok && t == typ {
			found, ok = b[off+unix.SizeofRtAttr:off+n], true
		}
		off += (n + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1)
	}
	return found, ok
}

// Contains reports whether the attributes encoded in b include every attribute of want
// with the same value, recursively: what was written is there, whatever else the kernel
// adds (newer kernels report more).
func Contains(b []byte, want []Attr) bool {
	got := Parse(b)
	for _, w := range want {
		d, ok := Get(got, w.Type)
		if !ok {
			return false
		}
		if w.Nested != nil {
			if !Contains(d, w.Nested) {
				return false
			}
		} else if !bytes.Equal(d, w.Data) {
			return false
		}
	}
	return true
}
