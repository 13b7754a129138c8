package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
)

// CarrierTable is the nftables table (family inet) the lab owns in the
// carrier namespace.
const CarrierTable = "iketcp_lab"

// Named counters in CarrierTable.
const (
	CounterUDPDropped   = "udp_dropped"   // forwarded UDP dropped while UDP is blocked
	CounterUDPForwarded = "udp_forwarded" // forwarded UDP let through
	CounterTCPForwarded = "tcp_forwarded" // forwarded TCP
	CounterTCPDropped   = "tcp_dropped"   // forwarded TCP toward the hub dropped while its port is blocked
)

// carrierRuleset: forwarded UDP is dropped while the set blocked_l4 holds
// "udp", and forwarded TCP toward the hub to the ports in
// blocked_tcp_ports; BlockUDP, AllowUDP and BlockTCPToHub only change the
// sets, so the rules, and with them the counters, stay as they are.
const carrierRuleset = `table inet iketcp_lab {
	counter udp_dropped {}
	counter udp_forwarded {}
	counter tcp_forwarded {}
	counter tcp_dropped {}
	set blocked_l4 {
		type inet_proto
	}
	set blocked_tcp_ports {
		type inet_service
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		meta l4proto @blocked_l4 meta l4proto udp counter name udp_dropped drop
		oifname "c-hub" tcp dport @blocked_tcp_ports counter name tcp_dropped drop
		meta l4proto udp counter name udp_forwarded
		meta l4proto tcp counter name tcp_forwarded
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "c-hub" masquerade
	}
}
`

func (l *Lab) setupCarrierFirewall(ctx context.Context) error {
	path := l.filePath("carrier-nftables", ".nft")
	if err := os.WriteFile(path, []byte(carrierRuleset), 0o644); err != nil {
		return fmt.Errorf("write carrier ruleset: %w", err)
	}
	if _, err := l.Carrier.Run(ctx, l.nftPath, "-f", path); err != nil {
		return fmt.Errorf("load carrier nftables ruleset: %w", err)
	}
	return nil
}

// BlockUDP makes the carrier drop every forwarded UDP packet (in both
// directions), counting them in udp_dropped. Established flows are cut too.
func (l *Lab) BlockUDP(ctx context.Context) error {
	if l.Carrier == nil {
		return errNoCarrier
	}
	if _, err := l.Carrier.Run(ctx, l.nftPath, "add", "element", "inet", CarrierTable, "blocked_l4", "{ udp }"); err != nil {
		return fmt.Errorf("block UDP at the carrier: %w", err)
	}
	l.logf("lab %s: carrier drops forwarded UDP", l.Name)
	return nil
}

// AllowUDP lets forwarded UDP through the carrier again. Counters keep their
// values.
func (l *Lab) AllowUDP(ctx context.Context) error {
	if l.Carrier == nil {
		return errNoCarrier
	}
	if _, err := l.Carrier.Run(ctx, l.nftPath, "flush", "set", "inet", CarrierTable, "blocked_l4"); err != nil {
		return fmt.Errorf("allow UDP at the carrier: %w", err)
	}
	l.logf("lab %s: carrier forwards UDP", l.Name)
	return nil
}

// BlockTCPToHub makes the carrier drop forwarded TCP toward the hub to
// port, counting the packets in tcp_dropped: the site cannot reach the
// hub's port directly. What the carrier itself sends (a proxy running in
// its namespace) is not forwarded, so it still gets through.
func (l *Lab) BlockTCPToHub(ctx context.Context, port uint16) error {
	if _, err := l.Carrier.Run(ctx, l.nftPath, "add", "element", "inet", CarrierTable, "blocked_tcp_ports", fmt.Sprintf("{ %d }", port)); err != nil {
		return fmt.Errorf("block TCP to the hub's port %d at the carrier: %w", port, err)
	}
	l.logf("lab %s: carrier drops forwarded TCP to the hub's port %d", l.Name, port)
	return nil
}

// TCPDropped returns how many forwarded TCP packets toward the hub the
// carrier dropped (BlockTCPToHub).
func (l *Lab) TCPDropped(ctx context.Context) (uint64, error) {
	packets, _, err := l.Counter(ctx, CounterTCPDropped)
	return packets, err
}

// UDPDropped returns how many forwarded UDP packets the carrier dropped.
func (l *Lab) UDPDropped(ctx context.Context) (uint64, error) {
	packets, _, err := l.Counter(ctx, CounterUDPDropped)
	return packets, err
}

// UDPForwarded returns how many UDP packets the carrier forwarded.
func (l *Lab) UDPForwarded(ctx context.Context) (uint64, error) {
	packets, _, err := l.Counter(ctx, CounterUDPForwarded)
	return packets, err
}

// TCPForwarded returns how many TCP packets the carrier forwarded.
func (l *Lab) TCPForwarded(ctx context.Context) (uint64, error) {
	packets, _, err := l.Counter(ctx, CounterTCPForwarded)
	return packets, err
}

// Counter reads a named counter of the carrier's table.
func (l *Lab) Counter(ctx context.Context, name string) (packets, bytes uint64, err error) {
	if l.Carrier == nil {
		return 0, 0, errNoCarrier
	}
	out, err := l.Carrier.Run(ctx, l.nftPath, "-j", "list", "counter", "inet", CarrierTable, name)
	if err != nil {
		return 0, 0, fmt.Errorf("read carrier counter %s: %w", name, err)
	}
	return parseNftCounter(out, name)
}

// parseNftCounter reads `nft -j list counter` output.
func parseNftCounter(out []byte, name string) (packets, bytes uint64, err error) {
	var doc struct {
		Nftables []struct {
			Counter *struct {
				Name    string `json:"name"`
				Packets uint64 `json:"packets"`
				Bytes   uint64 `json:"bytes"`
			} `json:"counter"`
		} `json:"nftables"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return 0, 0, fmt.Errorf("parse nft counter %s: %w", name, err)
	}
	for _, item := range doc.Nftables {
		if item.Counter != nil && item.Counter.Name == name {
			return item.Counter.Packets, item.Counter.Bytes, nil
		}
	}
	return 0, 0, fmt.Errorf("nft output has no counter %s", name)
}
