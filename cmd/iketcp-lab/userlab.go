package main

// `iketcp-lab up|test|down`: a lab that stays up between commands, so a
// user can rehearse traversal of a kind of carrier before going to the
// field.
//
// `up` starts a holder, this program's hidden `hold` command, in a session
// of its own. The holder builds the lab (namespaces, the carrier's
// profile, both strongSwans, iketcp server and client), owns it (the
// strict middlebox answers its queue from the holder's own goroutine),
// writes what it created to a state file under /run, answers `test` on a
// unix socket, and on SIGTERM closes the lab and removes the file. `down`
// asks the holder to stop, by its recorded PID; if the holder is gone, it
// removes what the file records itself: the processes (by PID and start
// time), the namespaces, the directories. Nothing else is touched.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/iketcp/iketcp/integration/lab"
)

const (
	// upTimeout bounds how long `up` waits for the holder to be ready.
	upTimeout = 2 * time.Minute
	// downTimeout bounds how long `down` waits for the holder to exit.
	downTimeout = time.Minute
	// testTimeout bounds one `test`.
	testTimeout = 90 * time.Second
	// userLabPrefix names user labs' namespaces, apart from the tests'.
	userLabPrefix = "ikl"
)

// Modes of a user lab.
const (
	modeExplicit    = "explicit"
	modeTransparent = "transparent"
	modeFakeTCP     = "fake-tcp"
)

var labNamePattern = regexp.MustCompile(`^[a-z][a-z0-9]{0,11}$`)

// labState is what `up` created, as the holder records it.
type labState struct {
	Name    string `json:"name"`
	Profile string `json:"profile"`
	Mode    string `json:"mode"`
	Iketcp  string `json:"iketcp"`
	// Holder is the holding process, "PID STARTTIME".
	Holder string `json:"holder"`
	// Lab is the lab's own name; its namespaces, processes (each "PID
	// STARTTIME") and directories follow.
	Lab           string   `json:"lab"`
	Namespaces    []string `json:"namespaces"`
	Processes     []string `json:"processes"`
	Dirs          []string `json:"dirs"`
	Socket        string   `json:"socket"`
	ServerControl string   `json:"server_control"`
	ClientControl string   `json:"client_control"`
	Log           string   `json:"log"`
}

func statePath(name string) string { return filepath.Join(lab.RunRoot, "user-"+name+".json") }
func socketPath(name string) string {
	return filepath.Join(lab.RunRoot, "user-"+name+".sock")
}
func holderLogPath(name string) string { return filepath.Join(lab.RunRoot, "user-"+name+".log") }

func readState(name string) (*labState, error) {
	b, err := os.ReadFile(statePath(name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no lab %q is up (no %s): start one with iketcp-lab up", name, statePath(name))
	}
	if err != nil {
		return nil, err
	}
	var st labState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("%s: %w", statePath(name), err)
	}
	return &st, nil
}

func nameFlag() cli.Flag {
	return &cli.StringFlag{Name: "name", Value: "default", Usage: "the lab's name, for several at once (lowercase letters and digits, at most 12)"}
}

func checkName(c *cli.Context) (string, error) {
	name := c.String("name")
	if !labNamePattern.MatchString(name) {
		return "", fmt.Errorf("--name %q: use 1-12 lowercase letters and digits, starting with a letter", name)
	}
	return name, nil
}

func userLabCommands() []*cli.Command {
	labFlags := []cli.Flag{
		nameFlag(),
		&cli.StringFlag{Name: "profile", Value: lab.ProfileBlockUDP, Usage: "the carrier: " + lab.ProfileNames()},
		&cli.StringFlag{Name: "mode", Value: modeExplicit, Usage: "how the site runs iketcp: explicit (strongSwan points at iketcp client), transparent (strongSwan unchanged, iketcp client --tun) or fake-tcp"},
		&cli.StringFlag{Name: "iketcp", Value: defaultBinary(), Usage: "the iketcp binary to run"},
		&cli.StringSliceFlag{Name: "client-arg", Usage: "one more argument for iketcp client (repeat: --client-arg --transport --client-arg auto)"},
		&cli.StringSliceFlag{Name: "server-arg", Usage: "one more argument for iketcp server (repeat)"},
	}
	var profiles strings.Builder
	for _, p := range lab.Profiles {
		fmt.Fprintf(&profiles, "   %-10s %s.\n              %s.\n", p.Name, p.About, p.Advice)
	}
	return []*cli.Command{
		{
			Name:  "up",
			Usage: "build a lab that stays up: site and hub strongSwan, iketcp client and server, and a carrier of the profile you pick",
			UsageText: "iketcp-lab up [--profile PROFILE] [--mode explicit|transparent|fake-tcp] [--client-arg ARG ...]\n\n" +
				"Example: rehearse a site whose carrier drops UDP, with the client falling back on its own:\n\n" +
				"   iketcp-lab up --profile block-udp --client-arg --transport --client-arg auto\n" +
				"   iketcp-lab test\n" +
				"   iketcp-lab down",
			Description: "Profiles (the carrier between site and hub):\n" + profiles.String() +
				"\nThe tunnel is not initiated: `iketcp-lab test` does that, probes the hub from the site, pings\n" +
				"through, and shows iketcp status. `iketcp-lab down` removes exactly what up created: the state\n" +
				"is in " + lab.RunRoot + "/user-NAME.json. Needs root.",
			Flags:  labFlags,
			Action: runUp,
		},
		{
			Name:      "test",
			Usage:     "rehearse on the lab that is up: probe the hub from the site, bring the tunnel up, ping through, show status",
			UsageText: "iketcp-lab test [--name NAME]\n\nExample:\n\n   iketcp-lab up --profile cgnat && iketcp-lab test",
			Description: "Exit status 0 when the tunnel came up and pings crossed, 1 otherwise. Run it again at will:\n" +
				"an IKE SA already up is kept.",
			Flags:  []cli.Flag{nameFlag()},
			Action: runTest,
		},
		{
			Name:      "down",
			Usage:     "remove the lab that up created, and only that",
			UsageText: "iketcp-lab down [--name NAME]",
			Description: "Asks the lab's holder to close it (SIGTERM, by its recorded PID and start time). If the holder\n" +
				"is gone, removes what the state file records: processes by PID and start time, namespaces and\n" +
				"directories by name.",
			Flags:  []cli.Flag{nameFlag()},
			Action: runDown,
		},
		{
			Name:   "hold",
			Hidden: true,
			Usage:  "(internal) build and hold a lab for up",
			Flags:  labFlags,
			Action: runHold,
		},
	}
}

func runUp(c *cli.Context) error {
	name, err := checkName(c)
	if err != nil {
		return err
	}
	if _, err := lab.FindProfile(c.String("profile")); err != nil {
		return err
	}
	if why := lab.MissingRequirements(); why != "" {
		return fmt.Errorf("%s (run: make deps)", why)
	}
	bin, err := exec.LookPath(c.String("iketcp"))
	if err != nil {
		return fmt.Errorf("iketcp binary %q: %w (run make build)", c.String("iketcp"), err)
	}
	if bin, err = filepath.Abs(bin); err != nil {
		return err
	}
	if st, err := readState(name); err == nil {
		if lab.StampAlive(st.Holder) {
			return fmt.Errorf("lab %q is up already (profile %s): iketcp-lab down --name %s first", name, st.Profile, name)
		}
		return fmt.Errorf("lab %q was left behind by a holder that is gone: iketcp-lab down --name %s removes it", name, name)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(lab.RunRoot, 0o755); err != nil {
		return err
	}
	logf, err := os.OpenFile(holderLogPath(name), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	args := []string{"hold", "--name", name, "--profile", c.String("profile"), "--mode", c.String("mode"), "--iketcp", bin}
	for _, a := range c.StringSlice("client-arg") {
		args = append(args, "--client-arg", a)
	}
	for _, a := range c.StringSlice("server-arg") {
		args = append(args, "--server-arg", a)
	}
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	fmt.Printf("building lab %q (profile %s, %s mode); the holder is pid %d, its log %s\n", name, c.String("profile"), c.String("mode"), cmd.Process.Pid, holderLogPath(name))
	deadline := time.Now().Add(upTimeout)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			log, _ := os.ReadFile(holderLogPath(name))
			return fmt.Errorf("the lab's holder exited (%v):\n%s", err, log)
		case <-c.Context.Done():
			cmd.Process.Signal(syscall.SIGTERM)
			<-exited
			return c.Context.Err()
		case <-time.After(100 * time.Millisecond):
		}
		st, err := readState(name)
		if err != nil {
			continue
		}
		p, _ := lab.FindProfile(st.Profile)
		fmt.Printf("lab %q is up: %s\n", name, p.About)
		fmt.Printf("  what gets through: %s\n", p.Advice)
		fmt.Println(indent(fmt.Sprintf(`site    %-28s lo %s, s0 %s/24, strongSwan, iketcp client
carrier %-28s NAT to %s
hub     %-28s lo %s, h0 %s/24, strongSwan, iketcp server on TCP %d

iketcp-lab test --name %s                                 probe, initiate, ping, status
ip netns exec %s %s probe %s
ip netns exec %s %s status --control %s
iketcp-lab down --name %s`,
			st.Namespaces[0], lab.SiteInner, lab.SiteOuter,
			st.Namespaces[1], lab.CarrierHub,
			st.Namespaces[2], lab.HubInner, lab.HubOuter, lab.ServerPort,
			name,
			st.Namespaces[0], bin, lab.HubOuter,
			st.Namespaces[0], bin, st.ClientControl,
			name)))
		return nil
	}
	cmd.Process.Signal(syscall.SIGTERM)
	return fmt.Errorf("the lab was not ready within %v; see %s, and run iketcp-lab down --name %s", upTimeout, holderLogPath(name), name)
}

// runHold builds the lab, records it, serves `test`, and closes the lab
// on SIGTERM or SIGINT.
func runHold(c *cli.Context) error {
	name, err := checkName(c)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	signal.Ignore(syscall.SIGHUP)
	setup, cancel := context.WithTimeout(ctx, upTimeout)
	defer cancel()
	logf := func(format string, args ...any) { fmt.Printf(time.Now().Format("15:04:05 ")+format+"\n", args...) }
	l, err := lab.New(setup, lab.Options{Prefix: userLabPrefix, Logf: logf})
	if err != nil {
		return err
	}
	defer func() {
		os.Remove(statePath(name))
		os.Remove(socketPath(name))
		if err := l.Close(); err != nil {
			logf("closing the lab: %v", err)
		}
		logf("lab %s closed", l.Name)
	}()
	if err := l.SetProfile(setup, c.String("profile")); err != nil {
		return err
	}
	opts := lab.TunnelOptions{Binary: c.String("iketcp"), ClientArgs: c.StringSlice("client-arg"), ServerArgs: c.StringSlice("server-arg")}
	switch c.String("mode") {
	case modeExplicit:
	case modeTransparent:
		opts.Transparent = true
	case modeFakeTCP:
		opts.ServerArgs = append([]string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.251.0/30"}, opts.ServerArgs...)
		opts.ClientArgs = append([]string{"--encap", "fake-tcp", "--fake-tcp-net", "100.64.250.0/30"}, opts.ClientArgs...)
	default:
		return fmt.Errorf("--mode %q: want explicit, transparent or fake-tcp", c.String("mode"))
	}
	tun, err := l.StartTunnel(setup, opts)
	if err != nil {
		return err
	}
	ln, err := net.Listen("unix", socketPath(name))
	if err != nil {
		return err
	}
	defer ln.Close()
	holder, err := lab.ProcessStamp(os.Getpid())
	if err != nil {
		return err
	}
	st := labState{
		Name: name, Profile: c.String("profile"), Mode: c.String("mode"), Iketcp: opts.Binary,
		Holder: holder, Lab: l.Name, Socket: socketPath(name),
		Dirs:          []string{l.Dir, filepath.Join(lab.RunRoot, l.Name)},
		ServerControl: tun.ServerControl, ClientControl: tun.ClientControl,
		Log: holderLogPath(name),
	}
	for _, ns := range l.Namespaces() {
		st.Namespaces = append(st.Namespaces, ns.Name)
	}
	for _, p := range l.Processes() {
		if stamp, err := lab.ProcessStamp(p.PID()); err == nil {
			st.Processes = append(st.Processes, stamp)
		}
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	// Written whole, then renamed: up reads it only once it is complete.
	tmp := statePath(name) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, statePath(name)); err != nil {
		return err
	}
	logf("lab %s up (profile %s, %s mode): %s", l.Name, st.Profile, st.Mode, statePath(name))
	go serveTests(ctx, ln, l, tun, logf)
	<-ctx.Done()
	logf("stopping: %v", context.Cause(ctx))
	return nil
}

// serveTests runs one test per connection on the lab's socket, one at a
// time, its report written to the connection.
func serveTests(ctx context.Context, ln net.Listener, l *lab.Lab, tun *lab.Tunnel, logf func(string, ...any)) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		logf("test requested")
		tctx, cancel := context.WithTimeout(ctx, testTimeout)
		err = rehearse(tctx, conn, l, tun)
		cancel()
		if err != nil {
			fmt.Fprintf(conn, "RESULT fail: %v\n", err)
		} else {
			fmt.Fprintln(conn, "RESULT ok")
		}
		conn.Close()
	}
}

// rehearse probes the hub from the site, brings the tunnel up unless it
// is, pings through it and shows both ends' status.
func rehearse(ctx context.Context, w io.Writer, l *lab.Lab, tun *lab.Tunnel) error {
	say := func(format string, args ...any) { fmt.Fprintf(w, "\n==> "+format+"\n", args...) }
	say("iketcp probe %s, from the site", lab.HubOuter)
	out, _ := l.Site.Run(ctx, tun.Opts.Binary, "probe", lab.HubOuter)
	fmt.Fprintln(w, indent(string(out)))

	say("Bringing the tunnel up from the site (swanctl --initiate)")
	sas, err := tun.Site.ListSAs(ctx)
	if err != nil {
		return err
	}
	if len(sas) > 0 && sas[0].State == "ESTABLISHED" {
		fmt.Fprintf(w, "    already up: IKE SA %s/%s\n", sas[0].InitiatorSPI, sas[0].ResponderSPI)
	} else {
		start := time.Now()
		sa, err := tun.Initiate(ctx)
		if err != nil {
			return fmt.Errorf("the tunnel did not come up: %w", err)
		}
		fmt.Fprintf(w, "    %s in %v: IKE SA %s/%s, %s -> %s\n", sa.State, time.Since(start).Round(time.Millisecond), sa.InitiatorSPI, sa.ResponderSPI, sa.LocalHost, sa.RemoteHost)
	}

	say("Pinging %s -> %s through the tunnel", lab.SiteInner, lab.HubInner)
	got, err := tun.PingThrough(ctx, 5, 200*time.Millisecond)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "    %d of 5 replies\n", got)

	say("iketcp status at the site")
	text, err := tun.StatusText(ctx, l.Site, tun.ClientControl)
	if err != nil {
		return err
	}
	fmt.Fprintln(w, indent(text))
	say("iketcp status at the hub")
	if text, err = tun.StatusText(ctx, l.Hub, tun.ServerControl); err != nil {
		return err
	}
	fmt.Fprintln(w, indent(text))
	if got == 0 {
		return errors.New("no ping crossed the tunnel")
	}
	return nil
}

func runTest(c *cli.Context) error {
	name, err := checkName(c)
	if err != nil {
		return err
	}
	st, err := readState(name)
	if err != nil {
		return err
	}
	if !lab.StampAlive(st.Holder) {
		return fmt.Errorf("lab %q's holder is gone: iketcp-lab down --name %s removes what is left", name, name)
	}
	var d net.Dialer
	conn, err := d.DialContext(c.Context, "unix", st.Socket)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(testTimeout + 10*time.Second))
	fmt.Printf("lab %q, profile %s, %s mode\n", name, st.Profile, st.Mode)
	sc := bufio.NewScanner(conn)
	result := ""
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "RESULT ") {
			result = strings.TrimPrefix(line, "RESULT ")
			continue
		}
		fmt.Println(line)
	}
	switch {
	case result == "ok":
		fmt.Println("\nresult: the tunnel is up and pings cross")
		return nil
	case result == "":
		return fmt.Errorf("the lab's holder ended the test without a result (%v); see %s", sc.Err(), st.Log)
	}
	return errors.New(result)
}

func runDown(c *cli.Context) error {
	name, err := checkName(c)
	if err != nil {
		return err
	}
	st, err := readState(name)
	if err != nil {
		return err
	}
	if lab.StampAlive(st.Holder) {
		if err := signalStamp(st.Holder, syscall.SIGTERM); err != nil {
			return err
		}
		deadline := time.Now().Add(downTimeout)
		for lab.StampAlive(st.Holder) && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if lab.StampAlive(st.Holder) {
			return fmt.Errorf("the lab's holder (%s) did not exit within %v; see %s", st.Holder, downTimeout, st.Log)
		}
	}
	// What the holder did not remove (it was killed, or crashed): the
	// recorded processes, namespaces and directories, and nothing else.
	var errs []error
	for _, p := range st.Processes {
		if lab.StampAlive(p) {
			if err := signalStamp(p, syscall.SIGKILL); err != nil {
				errs = append(errs, err)
			}
			fmt.Printf("killed process %s\n", p)
		}
	}
	for _, p := range st.Processes {
		for range 50 { // 5 s at most
			if !lab.StampAlive(p) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if lab.StampAlive(p) {
			errs = append(errs, fmt.Errorf("process %s still runs 5 s after SIGKILL", p))
		}
	}
	for _, ns := range st.Namespaces {
		if _, err := os.Stat(filepath.Join("/run/netns", ns)); err == nil {
			if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("ip netns del %s: %v: %s", ns, err, out))
			} else {
				fmt.Printf("deleted namespace %s\n", ns)
			}
		}
	}
	for _, d := range append(st.Dirs, st.Socket) {
		if _, err := os.Stat(d); err == nil {
			if err := os.RemoveAll(d); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	os.Remove(statePath(name))
	os.Remove(st.Log)
	fmt.Printf("lab %q is down: namespaces %s, %d processes and the files are gone\n", name, strings.Join(st.Namespaces, ", "), len(st.Processes))
	return nil
}

// signalStamp signals the process a ProcessStamp names, through a pidfd,
// so never a process that took over a recycled PID after the check.
func signalStamp(stamp string, sig syscall.Signal) error {
	var pid int
	if _, err := fmt.Sscan(stamp, &pid); err != nil {
		return err
	}
	p, err := os.FindProcess(pid)
	if err != nil {
		return err
	}
	defer p.Release()
	if !lab.StampAlive(stamp) {
		return nil
	}
	if err := p.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %s: %w", stamp, err)
	}
	return nil
}
