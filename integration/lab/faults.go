package lab

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// FaultTable is the nftables table (family inet) that holds the carrier's
// faults, apart from CarrierTable: a fault adds its chain there and goes
// with the table, and the carrier's own rules and counters stay as they
// are.
const FaultTable = "iketcp_lab_fault"

// RebindPorts is the range the carrier's NAT takes new mappings from after
// RebindNAT: outside Linux's ephemeral ports (32768-60999), which the
// plain masquerade keeps, so a rebound connection always shows a new
// public port.
const RebindPorts = "61000-65000"

// faultRulesets are the faults' chains, each a table of its own.
var faultRulesets = map[string]string{
	// Everything forwarded is dropped, both ways, before the carrier's
	// own rules see it.
	"blackout": `table inet iketcp_lab_fault {
	counter dropped {}
	chain forward {
		type filter hook forward priority filter - 10; policy accept;
		counter name dropped drop
	}
}
`,
	// New TCP mappings toward the hub come from RebindPorts; the chain
	// runs before the carrier's masquerade, so it decides.
	"rebind": `table inet iketcp_lab_fault {
	chain postrouting {
		type nat hook postrouting priority srcnat - 10; policy accept;
		oifname "c-hub" meta l4proto tcp counter masquerade to :` + RebindPorts + `
	}
}
`,
	// Every forwarded TCP segment of a connection under way (no SYN)
	// is answered with a RST to its sender and dropped.
	"reset": `table inet iketcp_lab_fault {
	counter resets {}
	chain forward {
		type filter hook forward priority filter - 10; policy accept;
		meta l4proto tcp tcp flags & (syn | rst) == 0 counter name resets reject with tcp reset
	}
}
`,
}

// addFault loads one of faultRulesets into the carrier.
func (l *Lab) addFault(ctx context.Context, name string) error {
	if l.Carrier == nil {
		return errNoCarrier
	}
	path := l.filePath("carrier-fault-"+name, ".nft")
	if err := os.WriteFile(path, []byte(faultRulesets[name]), 0o644); err != nil {
		return fmt.Errorf("write the carrier's %s fault: %w", name, err)
	}
	if _, err := l.Carrier.Run(ctx, l.nftPath, "-f", path); err != nil {
		return fmt.Errorf("carrier fault %s: %w", name, err)
	}
	l.logf("lab %s: carrier fault %s on", l.Name, name)
	return nil
}

// ClearFaults removes every fault from the carrier.
func (l *Lab) ClearFaults(ctx context.Context) error {
	if l.Carrier == nil {
		return errNoCarrier
	}
	// Debian 12's nft has no "destroy": add the table (nothing if it is
	// there), then delete it.
	if _, err := l.Carrier.Run(ctx, l.nftPath, "add", "table", "inet", FaultTable); err != nil {
		return fmt.Errorf("clear the carrier's faults: %w", err)
	}
	if _, err := l.Carrier.Run(ctx, l.nftPath, "delete", "table", "inet", FaultTable); err != nil {
		return fmt.Errorf("clear the carrier's faults: %w", err)
	}
	l.logf("lab %s: carrier faults cleared", l.Name)
	return nil
}

// Blackout makes the carrier drop everything it forwards, both ways, as a
// dead link or a full outage does, until ClearFaults. Connections stay
// open at both ends: nobody is told.
func (l *Lab) Blackout(ctx context.Context) error { return l.addFault(ctx, "blackout") }

// BlackoutDropped returns how many packets the blackout dropped.
func (l *Lab) BlackoutDropped(ctx context.Context) (uint64, error) {
	return l.faultCounter(ctx, "dropped")
}

// RebindNAT makes the carrier's NAT forget every TCP mapping (its
// conntrack entries, flushed with the conntrack tool) and take new ones
// from RebindPorts from now on, until ClearFaults: the client's
// connection, at its next segment, shows up at the hub from a new public
// port, as behind a carrier-grade NAT that rebinds. It returns once every
// TCP mapping the carrier holds is from RebindPorts (a segment in flight
// during the flush can bring the old mapping back: then it flushes again),
// bounded by 2 s.
func (l *Lab) RebindNAT(ctx context.Context) error {
	conntrack, err := mustFaultTool("conntrack")
	if err != nil {
		return err
	}
	if err := l.addFault(ctx, "rebind"); err != nil {
		return err
	}
	for attempt := 1; ; attempt++ {
		// conntrack -D exits 1 when it deleted nothing; its summary tells.
		out, err := l.Carrier.Command(ctx, conntrack, "-D", "-p", "tcp").CombinedOutput()
		if err != nil && ctx.Err() != nil {
			return ctx.Err()
		}
		l.logf("lab %s: carrier NAT flushed its TCP mappings: %s", l.Name, strings.TrimSpace(string(out)))
		time.Sleep(100 * time.Millisecond)
		list, err := l.Carrier.Command(ctx, conntrack, "-L", "-p", "tcp").Output()
		if err != nil {
			return fmt.Errorf("list the carrier's NAT mappings: %w", err)
		}
		old := oldMappings(string(list))
		if len(old) == 0 {
			return nil
		}
		if attempt == 20 {
			return fmt.Errorf("the carrier's NAT kept mappings outside %s: %s", RebindPorts, strings.Join(old, "; "))
		}
	}
}

// oldMappings returns the TCP mappings in `conntrack -L` output whose
// public port (the reply's destination port) is not from RebindPorts.
func oldMappings(list string) []string {
	lo, hi, _ := strings.Cut(RebindPorts, "-")
	min, _ := strconv.Atoi(lo)
	max, _ := strconv.Atoi(hi)
	var old []string
	for _, line := range strings.Split(list, "\n") {
		if !strings.HasPrefix(line, "tcp") {
			continue
		}
		var port int
		for _, f := range strings.Fields(line) {
			if p, ok := strings.CutPrefix(f, "dport="); ok {
				port, _ = strconv.Atoi(p) // the last is the reply's: the public port
			}
		}
		if port < min || port > max {
			old = append(old, strings.TrimSpace(line))
		}
	}
	return old
}

// ResetOnce makes the carrier answer the next segments of every TCP
// connection under way with a RST to their sender, as a middlebox that
// resets connections does, until one was reset or max passed; then the
// carrier forwards as before. It returns how many segments were answered
// with a RST.
func (l *Lab) ResetOnce(ctx context.Context, max time.Duration) (uint64, error) {
	if err := l.addFault(ctx, "reset"); err != nil {
		return 0, err
	}
	deadline := time.Now().Add(max)
	var n uint64
	var err error
	for {
		if n, err = l.faultCounter(ctx, "resets"); err != nil || n > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if cerr := l.ClearFaults(ctx); err == nil {
		err = cerr
	}
	return n, err
}

func (l *Lab) faultCounter(ctx context.Context, name string) (uint64, error) {
	out, err := l.Carrier.Run(ctx, l.nftPath, "-j", "list", "counter", "inet", FaultTable, name)
	if err != nil {
		return 0, fmt.Errorf("read fault counter %s: %w", name, err)
	}
	packets, _, err := parseNftCounter(out, name)
	return packets, err
}
