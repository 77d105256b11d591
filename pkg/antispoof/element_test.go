package antispoof

import (
	"bytes"
	"net/netip"
	"testing"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// TestMessagesMatchLibrary: the messages this package writes are byte for byte those
// github.com/google/nftables writes for the same change (the rules and the set's
// description are checked through `nft list` in TestAddDelete instead).
func TestMessagesMatchLibrary(t *testing.T) {
	var ks [][]byte
	var els []nftables.SetElement
	for i, ip := range []string{"10.244.1.2", "10.244.1.3", "192.168.255.254"} {
		k, err := EntryFor("na0123456789"+string(rune('a'+i)), netip.MustParseAddr(ip)).key()
		if err != nil {
			t.Fatal(err)
		}
		ks = append(ks, k)
		els = append(els, nftables.SetElement{Key: k})
	}
	var ks6 [][]byte
	var els6 []nftables.SetElement
	for _, e := range EntriesFor("na0123456789a", netip.MustParseAddr("fd00:244:1::5")) {
		k, err := e.key()
		if err != nil {
			t.Fatal(err)
		}
		ks6 = append(ks6, k)
		els6 = append(els6, nftables.SetElement{Key: k})
	}
	table := &nftables.Table{Name: Table, Family: nftables.TableFamilyBridge}
	set6 := &nftables.Set{ID: setID6, Table: table, Name: Set6, Concatenation: true,
		KeyType: nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIP6Addr, nftables.TypeEtherAddr)}
	set := &nftables.Set{ID: setID, Table: table, Name: Set, Concatenation: true,
		KeyType: nftables.MustConcatSetType(nftables.TypeIFName, nftables.TypeIPAddr, nftables.TypeEtherAddr)}
	policy := nftables.ChainPolicyAccept
	chain := &nftables.Chain{Table: table, Name: Chain, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(-200), Policy: &policy}
	for _, tc := range []struct {
		name string
		ours msg
		lib  func(*nftables.Conn) error
	}{
		{"add one element", elementMsg(unix.NFT_MSG_NEWSETELEM, ks[:1]), func(c *nftables.Conn) error { return c.SetAddElements(set, els[:1]) }},
		{"add elements", elementMsg(unix.NFT_MSG_NEWSETELEM, ks), func(c *nftables.Conn) error { return c.SetAddElements(set, els) }},
		{"delete elements", elementMsg(unix.NFT_MSG_DELSETELEM, ks), func(c *nftables.Conn) error { return c.SetDeleteElements(set, els) }},
		{"add IPv6 elements", elementMsgs(unix.NFT_MSG_NEWSETELEM, ks6)[0], func(c *nftables.Conn) error { return c.SetAddElements(set6, els6) }},
		{"delete IPv6 elements", elementMsgs(unix.NFT_MSG_DELSETELEM, ks6)[0], func(c *nftables.Conn) error { return c.SetDeleteElements(set6, els6) }},
		{"table", tableMsg(), func(c *nftables.Conn) error { c.AddTable(table); return nil }},
		{"chain", ensureMsgs()[1], func(c *nftables.Conn) error { c.AddChain(chain); return nil }},
		{"flush chain", ensureMsgs()[6], func(c *nftables.Conn) error { c.FlushChain(chain); return nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var sent []netlink.Message
			c, err := nftables.New(nftables.WithTestDial(func(req []netlink.Message) ([]netlink.Message, error) {
				sent = append(sent, req...)
				return []netlink.Message{{Header: netlink.Header{Type: netlink.Error}, Data: make([]byte, 4)}}, nil
			}))
			if err != nil {
				t.Fatal(err)
			}
			if err := tc.lib(c); err != nil {
				t.Fatal(err)
			}
			if err := c.Flush(); err != nil {
				t.Fatal(err)
			}
			if len(sent) != 3 {
				t.Fatalf("the library sent %d messages, want begin, one, end", len(sent))
			}
			m := sent[1]
			if want := netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | tc.ours.typ); m.Header.Type != want {
				t.Errorf("type: library %#x, ours %#x", m.Header.Type, want)
			}
			if want := netlink.HeaderFlags(unix.NLM_F_REQUEST | unix.NLM_F_ACK | tc.ours.flags); m.Header.Flags != want {
				t.Errorf("flags: library %v, ours %v", m.Header.Flags, want)
			}
			if got := tc.ours.body(); !bytes.Equal(got, m.Data) {
				t.Errorf("body: ours\n%x\nlibrary's\n%x", got, m.Data)
			}
			for _, b := range []netlink.Message{sent[0], sent[2]} {
				if !bytes.Equal(b.Data, batchHeader) {
					t.Errorf("batch message body: library %x, ours %x", b.Data, batchHeader)
				}
			}
		})
	}
}
