package realaddr

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The sets' keys: a socket's address and port, then its backend's address
// and port, as the daemon's datagrams to the socket carry them as
// destination and source. Each field fills whole 4-byte registers.
var (
	sessionKey4 = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService, nftables.TypeIPAddr, nftables.TypeInetService)
	sessionKey6 = nftables.MustConcatSetType(nftables.TypeIP6Addr, nftables.TypeInetService, nftables.TypeIP6Addr, nftables.TypeInetService)
)

// elementKey is the key of the element of a socket at local, connected to
// backend.
func elementKey(local, backend netip.AddrPort) []byte {
	k := make([]byte, 0, 40)
	k = append(k, local.Addr().AsSlice()...)
	k = append(k, byte(local.Port()>>8), byte(local.Port()), 0, 0)
	k = append(k, backend.Addr().AsSlice()...)
	return append(k, byte(backend.Port()>>8), byte(backend.Port()), 0, 0)
}

// installTable installs the table, its sets and its chain, in one
// transaction.
func (n *Net) installTable() error {
	c, t := n.nft, n.table
	c.AddTable(t)
	for _, s := range []*nftables.Set{n.set4, n.set6} {
		if err := c.AddSet(s, nil); err != nil {
			return fmt.Errorf("real-address mode: set %s: %w", s.Name, err)
		}
	}
	// A route chain: when it changes a locally made packet's mark, the
	// kernel routes the packet again (a filter chain would not), so the
	// policy rule sees the mark.
	accept := nftables.ChainPolicyAccept
	out := c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeRoute,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: sessionRule(n.set4, false, n.cfg.Mark)})
	c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: sessionRule(n.set6, true, n.cfg.Mark)})
	if err := c.Flush(); err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) {
			err = fmt.Errorf("%w (does the kernel have nf_tables with route chains, nft_chain_route, and concatenated sets? modprobe them, or load nf_tables on the host of the container)", err)
		}
		return modeRealAddr.Failed("install nftables table "+t.Name, err)
	}
	return nil
}

// sessionRule marks UDP whose destination and source are an element of
// set: the daemon's datagrams to a session's socket.
//
//	ip daddr . udp dport . ip saddr . udp sport @set meta mark set MARK
//
// The registers are nft's own: the address loaded into register 1 (the
// first four 32-bit ones), each following field into the next free 32-bit
// register.
func sessionRule(set *nftables.Set, v6 bool, mark uint32) []expr.Any {
	proto, daddr, saddr, size := byte(unix.NFPROTO_IPV4), uint32(16), uint32(12), uint32(4)
	regDport, regSaddr, regSport := uint32(9), uint32(10), uint32(11)
	if v6 {
		proto, daddr, saddr, size = unix.NFPROTO_IPV6, 24, 8, 16
		regDport, regSaddr, regSport = 2, 13, 17
	}
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: daddr, Len: size},
		&expr.Payload{DestRegister: regDport, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Payload{DestRegister: regSaddr, Base: expr.PayloadBaseNetworkHeader, Offset: saddr, Len: size},
		&expr.Payload{DestRegister: regSport, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
		&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(mark)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	}
}
