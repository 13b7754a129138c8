package uml

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Proposals matching the lab's strongSwan (integration/lab IKEProposal and
// ESPProposal) in libreswan's spelling. No PFS: strongSwan's
// esp_proposals carry no DH group.
const (
	PlutoIKE = "aes128-sha2_256-modp2048"
	PlutoESP = "aes128-sha2_256"
)

// PlutoConn is one libreswan connection (ipsec.conf conn section) with
// PSK authentication.
type PlutoConn struct {
	Name string
	// Left is the guest's own side: address, identity (e.g.
	// "@site.iketcp.test") and protected subnet.
	Left, LeftID, LeftSubnet string
	// LeftNextHop is the guest's next hop toward Right, for the route
	// libreswan's updown adds to RightSubnet; empty means Right itself
	// (only right when the peer is on the guest's link).
	LeftNextHop string
	// Right is the peer's side; Right may be "%any".
	Right, RightID, RightSubnet string
	PSK                         string
	// EnableTCP is libreswan's enable-tcp: "yes" (TCP only), "fallback"
	// or "" (no, UDP only).
	EnableTCP string
	// TCPRemotePort is tcp-remoteport; 0 keeps 4500.
	TCPRemotePort int
	// Auto is "add" (default), "start" or "ondemand".
	Auto string
	// RetransmitTimeout bounds an exchange's retransmissions; 0 keeps
	// libreswan's default (60 s).
	RetransmitTimeout time.Duration
	// DPDDelay switches dead peer detection on at this interval, with a
	// timeout of three intervals; 0 leaves it off.
	DPDDelay time.Duration
}

// PlutoOptions configure StartPluto.
type PlutoOptions struct {
	// ListenTCP is config setup's listen-tcp: pluto accepts RFC 9329
	// connections on TCP 4500.
	ListenTCP bool
	Conns     []PlutoConn
}

// Pluto is libreswan's IKE daemon running in a guest.
type Pluto struct {
	Guest *Guest
	// Dir holds its configuration, secrets, NSS database and log.
	Dir string
	// LogPath is pluto's log file.
	LogPath string

	whack string
}

const plutoRunDir = "/run/pluto" // on the guest's tmpfs: unix sockets do not work on hostfs

// StartPluto writes pluto's configuration into the guest's directory,
// creates an empty NSS database, starts pluto in the guest and waits
// until it answers whack with every connection loaded.
func StartPluto(ctx context.Context, g *Guest, opts PlutoOptions) (*Pluto, error) {
	sw := g.Opts.Libreswan
	if sw == nil {
		return nil, errors.New("StartPluto: the guest was booted without Libreswan")
	}
	if len(opts.Conns) == 0 {
		return nil, errors.New("StartPluto: no connections")
	}
	dir := filepath.Join(g.Opts.Dir, "pluto")
	nss := filepath.Join(dir, "nss")
	if err := os.MkdirAll(nss, 0o755); err != nil {
		return nil, err
	}
	conf, secrets, err := plutoConfig(opts)
	if err != nil {
		return nil, err
	}
	confPath, secretsPath := filepath.Join(dir, "ipsec.conf"), filepath.Join(dir, "ipsec.secrets")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(secretsPath, []byte(secrets), 0o600); err != nil {
		return nil, err
	}
	if out, err := exec.CommandContext(ctx, "certutil", "-N", "-d", "sql:"+nss, "--empty-password").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("certutil -N (libnss3-tools): %w: %s", err, out)
	}
	p := &Pluto{Guest: g, Dir: dir, LogPath: filepath.Join(dir, "pluto.log"), whack: sw.Whack()}
	start := fmt.Sprintf("mkdir -p %s\n%s --config %s --secretsfile %s --nssdir %s --rundir %s --logfile %s --nofork >%s 2>&1 </dev/null &\n",
		plutoRunDir, sw.Pluto(), confPath, secretsPath, nss, plutoRunDir, p.LogPath, filepath.Join(dir, "pluto.out"))
	if _, err := g.Run(ctx, start); err != nil {
		return nil, err
	}
	if err := p.waitLoaded(ctx, opts.Conns); err != nil {
		return nil, err
	}
	return p, nil
}

// plutoConfig renders ipsec.conf and ipsec.secrets.
func plutoConfig(opts PlutoOptions) (conf, secrets string, err error) {
	var c, s strings.Builder
	c.WriteString("config setup\n")
	fmt.Fprintf(&c, "\tlisten-tcp=%s\n", map[bool]string{true: "yes", false: "no"}[opts.ListenTCP])
	c.WriteString("\tplutodebug=base\n\tuniqueids=yes\n\n")
	for _, cn := range opts.Conns {
		for _, v := range []string{cn.Name, cn.Left, cn.LeftNextHop, cn.LeftID, cn.LeftSubnet, cn.Right, cn.RightID, cn.RightSubnet, cn.EnableTCP, cn.Auto} {
			if strings.ContainsAny(v, " \t\n\"#") {
				return "", "", fmt.Errorf("PlutoConn %s: %q must not contain spaces, quotes or '#'", cn.Name, v)
			}
		}
		if cn.Name == "" || cn.Left == "" || cn.Right == "" || cn.PSK == "" || strings.ContainsAny(cn.PSK, "\"\n") {
			return "", "", fmt.Errorf("PlutoConn %q: Name, Left, Right and PSK are required (PSK without quotes)", cn.Name)
		}
		fmt.Fprintf(&c, "conn %s\n", cn.Name)
		w := func(k, v string) {
			if v != "" {
				fmt.Fprintf(&c, "\t%s=%s\n", k, v)
			}
		}
		w("ikev2", "insist")
		w("authby", "secret")
		w("left", cn.Left)
		w("leftid", cn.LeftID)
		w("leftsubnet", cn.LeftSubnet)
		w("leftnexthop", cn.LeftNextHop)
		w("right", cn.Right)
		w("rightid", cn.RightID)
		w("rightsubnet", cn.RightSubnet)
		w("ike", PlutoIKE)
		w("esp", PlutoESP)
		w("pfs", "no")
		w("enable-tcp", cn.EnableTCP)
		if cn.TCPRemotePort != 0 {
			w("tcp-remoteport", strconv.Itoa(cn.TCPRemotePort))
		}
		if cn.RetransmitTimeout > 0 {
			w("retransmit-timeout", strconv.Itoa(int(cn.RetransmitTimeout/time.Second))+"s")
		}
		if cn.DPDDelay > 0 {
			w("dpddelay", strconv.Itoa(int(cn.DPDDelay/time.Second))+"s")
			w("dpdtimeout", strconv.Itoa(int(3*cn.DPDDelay/time.Second))+"s")
			w("dpdaction", "restart")
		}
		auto := cn.Auto
		if auto == "" {
			auto = "add"
		}
		w("auto", auto)
		c.WriteString("\n")
		fmt.Fprintf(&s, "%s %s : PSK \"%s\"\n", cn.LeftID, cn.RightID, cn.PSK)
	}
	return c.String(), s.String(), nil
}

func (p *Pluto) whackCmd(args ...string) string {
	return p.whack + " --ctlsocket " + plutoRunDir + "/pluto.ctl " + strings.Join(args, " ")
}

// Whack runs libreswan's whack in the guest with args.
func (p *Pluto) Whack(ctx context.Context, args ...string) (string, error) {
	return p.Guest.Run(ctx, p.whackCmd(args...))
}

// waitLoaded waits (at most 20 s) until whack --status lists every
// connection.
func (p *Pluto) waitLoaded(ctx context.Context, conns []PlutoConn) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	var last string
	for range 100 {
		out, err := p.Whack(ctx, "--status")
		last = out
		if err == nil {
			all := true
			for _, c := range conns {
				if !strings.Contains(out, "\""+c.Name+"\":") {
					all = false
				}
			}
			if all {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pluto did not load its connections: %w\nwhack --status:\n%s\npluto log:\n%s", ctx.Err(), tail(last, 2000), tail(p.Log(), 3000))
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("pluto did not load its connections\n%s", tail(p.Log(), 3000))
}

// Log returns pluto's log so far.
func (p *Pluto) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	out, _ := os.ReadFile(filepath.Join(p.Dir, "pluto.out"))
	return string(b) + string(out)
}

// Initiate starts the connection name (whack --initiate). It does not
// wait: whack stays attached until the exchange ends, which over a dead
// TCP stream is never, so it runs in the background with its output in
// the pluto directory.
func (p *Pluto) Initiate(ctx context.Context, name string) error {
	_, err := p.Guest.Run(ctx, p.whackCmd("--name", name, "--initiate", "--asynchronous")+
		" >>"+filepath.Join(p.Dir, "whack-initiate.out")+" 2>&1 </dev/null &")
	return err
}

// Terminate deletes the connection's SAs (whack --terminate), waiting at
// most 10 s for whack.
func (p *Pluto) Terminate(ctx context.Context, name string) (string, error) {
	return p.Guest.Run(ctx, "timeout 10 "+p.whackCmd("--name", name, "--terminate"))
}

// TrafficStatus is one line of whack --trafficstatus.
type TrafficStatus struct {
	Conn          string
	InBytes       uint64
	OutBytes      uint64
	Line          string
	EstablishedAt string
}

var trafficRe = regexp.MustCompile(`"([^"]+)"[^,]*,.*?inBytes=(\d+), outBytes=(\d+)`)

// ParseTrafficStatus reads whack --trafficstatus output: one entry per
// established CHILD SA.
func ParseTrafficStatus(out string) []TrafficStatus {
	var ts []TrafficStatus
	for _, line := range strings.Split(out, "\n") {
		m := trafficRe.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		in, _ := strconv.ParseUint(m[2], 10, 64)
		outB, _ := strconv.ParseUint(m[3], 10, 64)
		ts = append(ts, TrafficStatus{Conn: m[1], InBytes: in, OutBytes: outB, Line: strings.TrimSpace(line)})
	}
	return ts
}

// Traffic returns the parsed traffic status.
func (p *Pluto) Traffic(ctx context.Context) ([]TrafficStatus, string, error) {
	out, err := p.Whack(ctx, "--trafficstatus")
	if err != nil {
		return nil, out, err
	}
	return ParseTrafficStatus(out), out, nil
}

// WaitChild waits (at most d) until the connection has an established
// CHILD SA in whack --trafficstatus and returns its line.
func (p *Pluto) WaitChild(ctx context.Context, name string, d time.Duration) (TrafficStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var last string
	for range int(d/(200*time.Millisecond)) + 1 {
		ts, out, err := p.Traffic(ctx)
		last = out
		if err == nil {
			for _, t := range ts {
				if t.Conn == name {
					return t, nil
				}
			}
		}
		select {
		case <-ctx.Done():
			return TrafficStatus{}, fmt.Errorf("no CHILD SA for %s in pluto within %s; trafficstatus:\n%s\npluto log:\n%s", name, d, last, tail(p.Log(), 4000))
		case <-time.After(200 * time.Millisecond):
		}
	}
	return TrafficStatus{}, fmt.Errorf("no CHILD SA for %s in pluto within %s", name, d)
}
