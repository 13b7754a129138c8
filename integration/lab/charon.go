package lab

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Proposals the lab's charons use. They need only the plugins in
// charonPlugins (no openssl).
const (
	IKEProposal = "aes128-sha256-modp2048"
	ESPProposal = "aes128-sha256"
)

// charonPlugins is charon's static plugin list. kernel-libipsec must come
// before kernel-netlink so that it provides the IPsec backend (userspace
// ESP over TUN) while kernel-netlink keeps routing and addresses.
const charonPlugins = "random nonce drbg aes sha1 sha2 hmac gmp kdf kernel-libipsec kernel-netlink socket-default vici counters"

const (
	// charonReadyTimeout bounds the wait for charon's vici socket.
	charonReadyTimeout = 10 * time.Second
	// charonPollInterval is the pause between readiness and SA polls.
	charonPollInterval = 50 * time.Millisecond
)

// IKEConfig describes one swanctl connection with one child SA, using PSK
// authentication, the lab's proposals and forced UDP encapsulation
// (encap = yes, which kernel-libipsec needs).
type IKEConfig struct {
	// Name is the connection's and the child's name.
	Name string
	// LocalAddrs and RemoteAddrs are swanctl's local_addrs and
	// remote_addrs, e.g. "100.64.0.2", "127.0.0.1" or "%any". Empty
	// leaves strongSwan's default (%any).
	LocalAddrs, RemoteAddrs string
	// LocalPort and RemotePort are local_port and remote_port; 0 keeps the
	// default (500, floating to 4500 after NAT detection).
	LocalPort, RemotePort int
	// LocalID and RemoteID are the IKE identities; empty means
	// strongSwan's default (the IP address) and a PSK valid for any peer.
	LocalID, RemoteID string
	// PSK is the pre-shared key.
	PSK string
	// LocalTS and RemoteTS are the child's traffic selectors, e.g.
	// "198.51.100.0/24".
	LocalTS, RemoteTS string
	// Mobike switches MOBIKE; nil keeps strongSwan's default (on).
	Mobike *bool
	// StartAction is the child's start_action: "none", "trap" or "start";
	// empty means none.
	StartAction string
	// DPDDelay is the interval of dead peer detection; 0 turns it off.
	DPDDelay time.Duration
	// RekeyTime is the IKE SA's rekey_time; 0 keeps strongSwan's default.
	RekeyTime time.Duration
	// ChildRekeyTime is the child SA's rekey_time; 0 keeps the default.
	ChildRekeyTime time.Duration
	// RekeyOver is how long an SA may live past its rekey time: the IKE
	// SA's over_time, and the child's life_time less its rekey_time. 0
	// keeps strongSwan's 10% in whole seconds, which is nothing for a
	// rekey time under 10 s: the SA's deletion then races its rekey.
	RekeyOver time.Duration
}

func (cfg IKEConfig) validate() error {
	if cfg.Name == "" {
		return errors.New("IKEConfig.Name is empty")
	}
	if cfg.PSK == "" {
		return errors.New("IKEConfig.PSK is empty")
	}
	for field, v := range map[string]string{
		"Name": cfg.Name, "LocalAddrs": cfg.LocalAddrs, "RemoteAddrs": cfg.RemoteAddrs,
		"LocalID": cfg.LocalID, "RemoteID": cfg.RemoteID, "LocalTS": cfg.LocalTS,
		"RemoteTS": cfg.RemoteTS, "StartAction": cfg.StartAction,
	} {
		if strings.ContainsAny(v, "{}\"\n\r\t#= ") {
			return fmt.Errorf("IKEConfig.%s %q: must not contain spaces, quotes, braces, '=' or '#'", field, v)
		}
	}
	switch cfg.StartAction {
	case "", "none", "trap", "start":
	default:
		return fmt.Errorf("IKEConfig.StartAction %q: use none, trap or start", cfg.StartAction)
	}
	if cfg.LocalPort < 0 || cfg.LocalPort > 65535 || cfg.RemotePort < 0 || cfg.RemotePort > 65535 {
		return errors.New("IKEConfig ports must be within 0-65535")
	}
	return nil
}

// swanctlConf renders the connection and its secret.
func (cfg IKEConfig) swanctlConf() string { return swanctlConf([]IKEConfig{cfg}) }

// swanctlConf renders connections and their secrets: one connections
// section and one secrets section for all of them.
func swanctlConf(cfgs []IKEConfig) string {
	var b strings.Builder
	w := func(indent int, format string, args ...any) {
		b.WriteString(strings.Repeat("    ", indent))
		fmt.Fprintf(&b, format, args...)
		b.WriteByte('\n')
	}
	w(0, "connections {")
	for _, cfg := range cfgs {
		cfg.writeConnection(w)
	}
	w(0, "}")
	w(0, "secrets {")
	for _, cfg := range cfgs {
		cfg.writeSecret(w)
	}
	w(0, "}")
	return b.String()
}

// writeConnection renders the connection's section inside connections.
func (cfg IKEConfig) writeConnection(w func(indent int, format string, args ...any)) {
	w(1, "%s {", cfg.Name)
	w(2, "version = 2")
	if cfg.LocalAddrs != "" {
		w(2, "local_addrs = %s", cfg.LocalAddrs)
	}
	if cfg.RemoteAddrs != "" {
		w(2, "remote_addrs = %s", cfg.RemoteAddrs)
	}
	if cfg.LocalPort != 0 {
		w(2, "local_port = %d", cfg.LocalPort)
	}
	if cfg.RemotePort != 0 {
		w(2, "remote_port = %d", cfg.RemotePort)
	}
	w(2, "proposals = %s", IKEProposal)
	w(2, "encap = yes")
	if cfg.Mobike != nil {
		w(2, "mobike = %s", yesNo(*cfg.Mobike))
	}
	if cfg.DPDDelay > 0 {
		w(2, "dpd_delay = %ds", seconds(cfg.DPDDelay))
	}
	if cfg.RekeyTime > 0 {
		w(2, "rekey_time = %ds", seconds(cfg.RekeyTime))
		if cfg.RekeyOver > 0 {
			w(2, "over_time = %ds", seconds(cfg.RekeyOver))
		}
	}
	w(2, "local {")
	w(3, "auth = psk")
	if cfg.LocalID != "" {
		w(3, "id = %s", cfg.LocalID)
	}
	w(2, "}")
	w(2, "remote {")
	w(3, "auth = psk")
	if cfg.RemoteID != "" {
		w(3, "id = %s", cfg.RemoteID)
	}
	w(2, "}")
	w(2, "children {")
	w(3, "%s {", cfg.Name)
	if cfg.LocalTS != "" {
		w(4, "local_ts = %s", cfg.LocalTS)
	}
	if cfg.RemoteTS != "" {
		w(4, "remote_ts = %s", cfg.RemoteTS)
	}
	w(4, "esp_proposals = %s", ESPProposal)
	if cfg.ChildRekeyTime > 0 {
		w(4, "rekey_time = %ds", seconds(cfg.ChildRekeyTime))
		if cfg.RekeyOver > 0 {
			w(4, "life_time = %ds", seconds(cfg.ChildRekeyTime+cfg.RekeyOver))
		}
	}
	startAction := cfg.StartAction
	if startAction == "" {
		startAction = "none"
	}
	w(4, "start_action = %s", startAction)
	w(3, "}")
	w(2, "}")
	w(1, "}")
}

// writeSecret renders the connection's PSK inside secrets.
func (cfg IKEConfig) writeSecret(w func(indent int, format string, args ...any)) {
	w(1, "ike-%s {", cfg.Name)
	if cfg.LocalID != "" {
		w(2, "id-local = %s", cfg.LocalID)
	}
	if cfg.RemoteID != "" {
		w(2, "id-remote = %s", cfg.RemoteID)
	}
	// Hex keeps any PSK free of quoting trouble.
	w(2, "secret = 0x%s", hex.EncodeToString([]byte(cfg.PSK)))
	w(1, "}")
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func seconds(d time.Duration) int64 {
	s := int64((d + time.Second - 1) / time.Second)
	return max(s, 1)
}

// strongswanConf renders the daemon's configuration.
func strongswanConf(logPath, viciURI string) string {
	return fmt.Sprintf(`charon {
    load_modular = no
    load = %s
    retransmit_timeout = 1.0
    retransmit_base = 1.4
    retransmit_tries = 4
    filelog {
        main {
            path = "%s"
            append = no
            flush_line = yes
            time_format = "%%H:%%M:%%S"
            default = 1
            ike = 2
            net = 2
        }
    }
    plugins {
        vici {
            socket = "%s"
        }
    }
}
charon-systemd {
    journal {
        default = -1
    }
}
swanctl {
    socket = "%s"
    load = random
}
`, charonPlugins, logPath, viciURI, viciURI)
}

// Charon is a strongSwan charon daemon running in one of the lab's
// namespaces with one connection loaded, or several.
type Charon struct {
	// Namespace is where the daemon runs.
	Namespace *Namespace
	// Config is the loaded connection (the first, if several are).
	Config IKEConfig
	// Configs are all the loaded connections, Config first.
	Configs []IKEConfig
	// Dir holds strongswan.conf, swanctl.conf, charon.log (the daemon's
	// filelog) and charon.out (its standard output and error).
	Dir string
	// ViciURI is the daemon's control socket, e.g. unix:///run/...vici.
	ViciURI string

	confPath    string
	swanctlConf string
	logPath     string
	swanctlPath string
	proc        *Process
}

// StartCharon starts charon-systemd in ns with its own configuration,
// waits until its control socket answers and loads cfg and the more
// connections given, each an IKE SA of its own when initiated (names must
// differ; give them different identities too, or charon may put their
// child SAs into one IKE SA). One charon per namespace: a second one
// would find UDP 500 and 4500 taken.
func (l *Lab) StartCharon(ctx context.Context, ns *Namespace, cfg IKEConfig, more ...IKEConfig) (*Charon, error) {
	cfgs := append([]IKEConfig{cfg}, more...)
	names := make(map[string]bool, len(cfgs))
	for _, c := range cfgs {
		if err := c.validate(); err != nil {
			return nil, err
		}
		if names[c.Name] {
			return nil, fmt.Errorf("StartCharon: two connections named %s", c.Name)
		}
		names[c.Name] = true
	}
	if ns == nil || ns.lab != l {
		return nil, errors.New("StartCharon: namespace does not belong to this lab")
	}
	if !isExecutable(CharonPath) {
		return nil, fmt.Errorf("%s not found: run make deps", CharonPath)
	}
	l.mu.Lock()
	seq := len(l.charons) + 1
	l.mu.Unlock()
	dir := filepath.Join(l.Dir, fmt.Sprintf("charon-%s-%s-%d", ns.Role, cfg.Name, seq))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create charon directory: %w", err)
	}
	c := &Charon{
		Namespace:   ns,
		Config:      cfg,
		Configs:     cfgs,
		Dir:         dir,
		ViciURI:     "unix://" + filepath.Join(l.runDir, fmt.Sprintf("%s-%d.vici", ns.Role, seq)),
		confPath:    filepath.Join(dir, "strongswan.conf"),
		swanctlConf: filepath.Join(dir, "swanctl.conf"),
		logPath:     filepath.Join(dir, "charon.log"),
		swanctlPath: l.swanctl,
	}
	if len(c.ViciURI)-len("unix://") > 100 {
		return nil, fmt.Errorf("vici socket path %s is too long for a unix socket", c.ViciURI)
	}
	if err := os.WriteFile(c.confPath, []byte(strongswanConf(c.logPath, c.ViciURI)), 0o644); err != nil {
		return nil, fmt.Errorf("write strongswan.conf: %w", err)
	}
	if err := os.WriteFile(c.swanctlConf, []byte(swanctlConf(cfgs)), 0o600); err != nil {
		return nil, fmt.Errorf("write swanctl.conf: %w", err)
	}
	proc, err := ns.start(ctx, filepath.Join(dir, "charon.out"), []string{"STRONGSWAN_CONF=" + c.confPath}, CharonPath)
	if err != nil {
		return nil, err
	}
	c.proc = proc
	l.mu.Lock()
	l.charons = append(l.charons, c)
	l.mu.Unlock()
	if err := c.waitReady(ctx); err != nil {
		c.Stop()
		return nil, err
	}
	out, err := c.Swanctl(ctx, "--load-all", "--noprompt", "--file", c.swanctlConf)
	if err != nil {
		c.Stop()
		return nil, fmt.Errorf("load connection %s into charon in %s: %w", c.connNames(), ns.Role, err)
	}
	for _, cfg := range cfgs {
		if !strings.Contains(string(out), "loaded connection '"+cfg.Name+"'") {
			c.Stop()
			return nil, fmt.Errorf("charon in %s did not load connection %s: %s", ns.Role, cfg.Name, out)
		}
	}
	l.logf("lab %s: charon in %s ready with connection %s (pid %d)", l.Name, ns.Role, c.connNames(), proc.PID())
	return c, nil
}

func (c *Charon) connNames() string {
	names := make([]string, len(c.Configs))
	for i, cfg := range c.Configs {
		names[i] = cfg.Name
	}
	return strings.Join(names, ", ")
}

// hasConn reports whether the connection name is loaded.
func (c *Charon) hasConn(name string) error {
	for _, cfg := range c.Configs {
		if cfg.Name == name {
			return nil
		}
	}
	return fmt.Errorf("charon in %s has no connection %s (it has %s)", c.Namespace.Role, name, c.connNames())
}

// waitReady polls `swanctl --stats` until charon answers.
func (c *Charon) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, charonReadyTimeout)
	defer cancel()
	var lastErr error
	for attempt := 0; attempt < int(charonReadyTimeout/charonPollInterval); attempt++ {
		if c.proc.Exited() {
			return fmt.Errorf("charon in %s exited during startup (%v); output: %s; log: %s",
				c.Namespace.Role, c.proc.ExitErr(), strings.TrimSpace(c.proc.Log()), tail(c.Log(), 2000))
		}
		if _, err := c.Swanctl(ctx, "--stats"); err == nil {
			return nil
		} else {
			lastErr = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("charon in %s not answering on %s: %w (last error: %v)", c.Namespace.Role, c.ViciURI, ctx.Err(), lastErr)
		case <-time.After(charonPollInterval):
		}
	}
	return fmt.Errorf("charon in %s not answering on %s: %v", c.Namespace.Role, c.ViciURI, lastErr)
}

// Swanctl runs swanctl against this daemon (its configuration and vici
// socket) and returns the combined output.
func (c *Charon) Swanctl(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, c.swanctlPath, append(args, "--uri", c.ViciURI)...)
	cmd.Env = append(os.Environ(), "STRONGSWAN_CONF="+c.confPath)
	cmd.WaitDelay = waitDelay
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, commandError("", append([]string{"swanctl"}, args...), out, withContextErr(ctx, err))
	}
	return out, nil
}

// Initiate starts the connection's child SA (and so the IKE SA) and waits
// until it is established or has failed, bounded by ctx.
func (c *Charon) Initiate(ctx context.Context) error { return c.InitiateConn(ctx, c.Config.Name) }

// InitiateConn is Initiate for the loaded connection name.
func (c *Charon) InitiateConn(ctx context.Context, name string) error {
	if err := c.hasConn(name); err != nil {
		return err
	}
	if _, err := c.Swanctl(ctx, "--initiate", "--ike", name, "--child", name); err != nil {
		return fmt.Errorf("initiate %s from %s: %w", name, c.Namespace.Role, err)
	}
	return nil
}

// RekeyIKE rekeys the IKE SA of the connection name (`swanctl --rekey
// --ike`): a CREATE_CHILD_SA exchange in the old IKE SA makes a new one
// with new SPIs, the child SAs move to it and the old one is deleted. It
// returns the new IKE SA once it is the connection's only one, ESTABLISHED
// with an INSTALLED child SA, bounded by ctx and by one minute.
func (c *Charon) RekeyIKE(ctx context.Context, name string) (IKESA, error) {
	old, err := c.WaitEstablishedConn(ctx, name)
	if err != nil {
		return IKESA{}, err
	}
	if _, err := c.Swanctl(ctx, "--rekey", "--ike", name); err != nil {
		return IKESA{}, fmt.Errorf("rekey IKE SA %s in %s: %w", name, c.Namespace.Role, err)
	}
	return c.waitSA(ctx, name, "no new IKE SA after the rekey of", func(sas []IKESA) (IKESA, bool) {
		var mine []IKESA
		for _, sa := range sas {
			if sa.Name == name {
				mine = append(mine, sa)
			}
		}
		if len(mine) != 1 {
			return IKESA{}, false
		}
		sa := mine[0]
		return sa, sa.State == "ESTABLISHED" && sa.HasInstalledChild() &&
			sa.InitiatorSPI != old.InitiatorSPI && sa.ResponderSPI != old.ResponderSPI
	})
}

// Terminate deletes the connection's IKE SAs (and their children). It sends
// the peer a DELETE but does not wait for the answer (swanctl --force), so
// it returns at once even when the peer is unreachable.
func (c *Charon) Terminate(ctx context.Context) error {
	if _, err := c.Swanctl(ctx, "--terminate", "--ike", c.Config.Name, "--force"); err != nil {
		return fmt.Errorf("terminate %s in %s: %w", c.Config.Name, c.Namespace.Role, err)
	}
	return nil
}

// ListSAs returns the daemon's IKE SAs with their child SAs.
func (c *Charon) ListSAs(ctx context.Context) ([]IKESA, error) {
	out, err := c.Swanctl(ctx, "--list-sas", "--pretty")
	if err != nil {
		return nil, err
	}
	return ParseListSAs(out)
}

// RekeyChild rekeys the child SA of the connection name (`swanctl --rekey
// --child`): a CREATE_CHILD_SA exchange in its current IKE SA. It returns
// the IKE SA once its only child SA is INSTALLED with new SPIs, bounded by
// ctx and by one minute.
func (c *Charon) RekeyChild(ctx context.Context, name string) (IKESA, error) {
	old, err := c.WaitEstablishedConn(ctx, name)
	if err != nil {
		return IKESA{}, err
	}
	if _, err := c.Swanctl(ctx, "--rekey", "--child", name); err != nil {
		return IKESA{}, fmt.Errorf("rekey child SA %s in %s: %w", name, c.Namespace.Role, err)
	}
	return c.waitSA(ctx, name, "no new child SA after the rekey of", func(sas []IKESA) (IKESA, bool) {
		for _, sa := range sas {
			if sa.Name != name || sa.InitiatorSPI != old.InitiatorSPI || sa.State != "ESTABLISHED" || len(sa.Children) != 1 {
				continue
			}
			ch := sa.Children[0]
			return sa, ch.State == "INSTALLED" && ch.SPIIn != old.Children[0].SPIIn && ch.SPIOut != old.Children[0].SPIOut
		}
		return IKESA{}, false
	})
}

// WaitEstablished polls ListSAs until the connection has an ESTABLISHED IKE
// SA with an INSTALLED child SA and returns that SA. It is bounded by ctx
// and by one minute.
func (c *Charon) WaitEstablished(ctx context.Context) (IKESA, error) {
	return c.WaitEstablishedConn(ctx, c.Config.Name)
}

// WaitEstablishedConn is WaitEstablished for the loaded connection name.
func (c *Charon) WaitEstablishedConn(ctx context.Context, name string) (IKESA, error) {
	if err := c.hasConn(name); err != nil {
		return IKESA{}, err
	}
	return c.waitSA(ctx, name, "no established SA", func(sas []IKESA) (IKESA, bool) {
		for _, sa := range sas {
			if sa.Name == name && sa.State == "ESTABLISHED" && sa.HasInstalledChild() {
				return sa, true
			}
		}
		return IKESA{}, false
	})
}

// waitSA polls ListSAs until found picks an SA, bounded by ctx and by one
// minute; what names the wait in the error.
func (c *Charon) waitSA(ctx context.Context, name, what string, found func([]IKESA) (IKESA, bool)) (IKESA, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var last []IKESA
	for range int(time.Minute / charonPollInterval) {
		sas, err := c.ListSAs(ctx)
		if err == nil {
			last = sas
			if sa, ok := found(sas); ok {
				return sa, nil
			}
		}
		select {
		case <-ctx.Done():
			return IKESA{}, fmt.Errorf("%s %s in %s: %w (SAs: %+v)", what, name, c.Namespace.Role, ctx.Err(), last)
		case <-time.After(charonPollInterval):
		}
	}
	return IKESA{}, fmt.Errorf("%s %s in %s (SAs: %+v)", what, name, c.Namespace.Role, last)
}

// Log returns the content of charon's filelog (IKE and net at level 2).
func (c *Charon) Log() string {
	b, err := os.ReadFile(c.logPath)
	if err != nil {
		return ""
	}
	return string(b)
}

// LogPath is charon's filelog.
func (c *Charon) LogPath() string { return c.logPath }

// CountInLog counts the occurrences of substr in charon's filelog, e.g.
// "sending packet" or "generating IKE_SA_INIT request".
func (c *Charon) CountInLog(substr string) int {
	if substr == "" {
		return 0
	}
	return strings.Count(c.Log(), substr)
}

// PID is the daemon's process ID.
func (c *Charon) PID() int { return c.proc.PID() }

// Process is the daemon's process.
func (c *Charon) Process() *Process { return c.proc }

// Stop ends the daemon (SIGTERM, then SIGKILL after 5 s). Idempotent.
func (c *Charon) Stop() error { return c.proc.Stop() }

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}

// formatSeconds renders a duration for command-line tools that take
// (fractional) seconds.
func formatSeconds(d time.Duration) string {
	return strconv.FormatFloat(d.Seconds(), 'f', -1, 64)
}
