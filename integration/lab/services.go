package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// serviceReadyTimeout bounds the wait for a service to listen.
const serviceReadyTimeout = 10 * time.Second

// Service is a third-party daemon (HAProxy, nginx, tinyproxy) that the lab
// runs in the foreground in one of its namespaces, with a configuration
// the lab writes: its PID is the daemon's own (for nginx, the master's),
// its output goes to its log, and the lab stops it by PID on Close. The
// daemons' packages install system services too; those never run here:
// each instance is the lab's, with its files in Dir.
type Service struct {
	*Process
	// Dir holds the daemon's configuration, pid file and logs.
	Dir string
	// Listen is the address it accepts on, host:port.
	Listen string
}

// File returns the path of a file in the service's directory.
func (s *Service) File(name string) string { return filepath.Join(s.Dir, name) }

// HAProxyOptions configure StartHAProxy: a TCP front end that passes
// every connection to one server, with a PROXY protocol version 2 header
// in front (send-proxy-v2).
type HAProxyOptions struct {
	// Listen is where HAProxy accepts, host:port.
	Listen string
	// Server is where it connects, host:port.
	Server string
	// Source, if set, is the address it connects from (the server's
	// --proxy-protocol-from names it); else the kernel picks.
	Source string
}

// StartHAProxy runs HAProxy in ns as opts say, in the foreground (-db),
// logging every connection (tcplog, as soon as it is set up) to its
// output, and returns once it listens.
func (ns *Namespace) StartHAProxy(ctx context.Context, opts HAProxyOptions) (*Service, error) {
	if opts.Listen == "" || opts.Server == "" {
		return nil, errors.New("StartHAProxy: Listen and Server are required")
	}
	server := "server iketcp " + opts.Server + " send-proxy-v2"
	if opts.Source != "" {
		server += " source " + opts.Source
	}
	return ns.startService(ctx, "haproxy", opts.Listen, func(dir string) serviceConfig {
		conf := filepath.Join(dir, "haproxy.cfg")
		return serviceConfig{path: conf, args: []string{"-db", "-f", conf}, content: fmt.Sprintf(`global
	pidfile %s
	log stdout format raw local0 info
	maxconn 256

defaults
	mode tcp
	log global
	option tcplog
	option logasap
	timeout connect 5s
	timeout client 5m
	timeout server 5m

frontend public
	bind %s
	default_backend iketcp

backend iketcp
	%s
`, filepath.Join(dir, "haproxy.pid"), opts.Listen, server)}
	})
}

// NginxOptions configure StartNginx: an HTTPS site.
type NginxOptions struct {
	// Listen is where nginx accepts HTTPS, host:port.
	Listen string
	// CertFile and KeyFile are its certificate and key (PEM).
	CertFile, KeyFile string
	// Index is the content of the site's only page, /index.html.
	Index string
}

// StartNginx runs nginx in ns as opts say, in the foreground (daemon
// off), its requests logged to File("access.log"), and returns once it
// listens.
func (ns *Namespace) StartNginx(ctx context.Context, opts NginxOptions) (*Service, error) {
	if opts.Listen == "" || opts.CertFile == "" || opts.KeyFile == "" {
		return nil, errors.New("StartNginx: Listen, CertFile and KeyFile are required")
	}
	return ns.startService(ctx, "nginx", opts.Listen, func(dir string) serviceConfig {
		www := filepath.Join(dir, "www")
		conf := filepath.Join(dir, "nginx.conf")
		temp := func(what string) string { return filepath.Join(dir, "temp-"+what) }
		// user root: the workers read files under the test's private
		// temporary directory, which nobody (nginx's default) cannot.
		return serviceConfig{
			path:  conf,
			args:  []string{"-e", "stderr", "-p", dir, "-c", conf, "-g", "daemon off;"},
			files: map[string]string{filepath.Join(www, "index.html"): opts.Index},
			content: fmt.Sprintf(`user root;
worker_processes 1;
pid %s;
error_log stderr info;
events { worker_connections 64; }
http {
	access_log %s;
	client_body_temp_path %s;
	proxy_temp_path %s;
	fastcgi_temp_path %s;
	uwsgi_temp_path %s;
	scgi_temp_path %s;
	default_type text/plain;
	server {
		listen %s ssl;
		ssl_certificate %s;
		ssl_certificate_key %s;
		ssl_protocols TLSv1.2 TLSv1.3;
		root %s;
	}
}
`, filepath.Join(dir, "nginx.pid"), filepath.Join(dir, "access.log"), temp("body"), temp("proxy"), temp("fastcgi"),
				temp("uwsgi"), temp("scgi"), opts.Listen, opts.CertFile, opts.KeyFile, www),
		}
	})
}

// TinyproxyOptions configure StartTinyproxy: an HTTP proxy.
type TinyproxyOptions struct {
	// Listen is where tinyproxy accepts, an IPv4 address and a port.
	Listen string
	// ConnectPorts are the ports CONNECT may reach (any if empty).
	ConnectPorts []int
	// User and Password, if set, are the Basic credentials it requires.
	User, Password string
}

// StartTinyproxy runs tinyproxy in ns as opts say, in the foreground
// (-d), logging every request to its output, and returns once it listens.
func (ns *Namespace) StartTinyproxy(ctx context.Context, opts TinyproxyOptions) (*Service, error) {
	host, port, err := net.SplitHostPort(opts.Listen)
	if err != nil || host == "" {
		return nil, fmt.Errorf("StartTinyproxy: Listen %q: want address:port", opts.Listen)
	}
	return ns.startService(ctx, "tinyproxy", opts.Listen, func(dir string) serviceConfig {
		conf := filepath.Join(dir, "tinyproxy.conf")
		var b strings.Builder
		fmt.Fprintf(&b, "Port %s\nListen %s\nTimeout 300\nMaxClients 32\nPidFile %q\nLogLevel Info\nDisableViaHeader Yes\n",
			port, host, filepath.Join(dir, "tinyproxy.pid"))
		for _, p := range opts.ConnectPorts {
			fmt.Fprintf(&b, "ConnectPort %d\n", p)
		}
		if opts.User != "" {
			fmt.Fprintf(&b, "BasicAuth %s %s\n", opts.User, opts.Password)
		}
		return serviceConfig{path: conf, content: b.String(), args: []string{"-d", "-c", conf}}
	})
}

// serviceConfig is what a service runs with: its configuration file,
// other files it serves, and its arguments.
type serviceConfig struct {
	path, content string
	files         map[string]string // path: content
	args          []string
}

// startService writes a service's configuration (config is given the
// service's own directory), starts it and waits until it listens.
func (ns *Namespace) startService(ctx context.Context, name, listen string, config func(dir string) serviceConfig) (*Service, error) {
	l := ns.lab
	path := toolPath(name)
	if path == "" {
		return nil, fmt.Errorf("%s not found: run make deps (apt-get install %s)", name, strings.Join(DebianPackages, " "))
	}
	dir := l.filePath(ns.Role+"-"+name, "")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create %s directory: %w", name, err)
	}
	cfg := config(dir)
	files := map[string]string{cfg.path: cfg.content}
	for p, content := range cfg.files {
		files[p] = content
	}
	for p, content := range files {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return nil, fmt.Errorf("%s: write %s: %w", name, p, err)
		}
	}
	p, err := ns.Start(ctx, filepath.Join(dir, name+".log"), path, cfg.args...)
	if err != nil {
		return nil, err
	}
	s := &Service{Process: p, Dir: dir, Listen: listen}
	if err := ns.waitListening(ctx, listen, p); err != nil {
		p.Stop()
		return nil, fmt.Errorf("%s in %s: %w", name, ns.Role, err)
	}
	l.logf("lab %s: %s listening on %s in %s (pid %d, files in %s)", l.Name, name, listen, ns.Role, p.PID(), dir)
	return s, nil
}

// waitListening polls `ss -Hltn` in the namespace until a TCP socket
// listens on addr, bounded by serviceReadyTimeout; it gives up early if p
// exits.
func (ns *Namespace) waitListening(ctx context.Context, addr string, p *Process) error {
	ctx, cancel := context.WithTimeout(ctx, serviceReadyTimeout)
	defer cancel()
	const poll = 50 * time.Millisecond
	for range int(serviceReadyTimeout / poll) {
		out, err := ns.Run(ctx, "ss", "-Hltn")
		if err == nil && listensOn(out, addr) {
			return nil
		}
		if p.Exited() {
			return fmt.Errorf("exited at start (%v): %s", p.ExitErr(), tail(p.Log(), 2000))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not listening on %s: %w: %s", addr, ctx.Err(), tail(p.Log(), 2000))
		case <-time.After(poll):
		}
	}
	return fmt.Errorf("not listening on %s after %s: %s", addr, serviceReadyTimeout, tail(p.Log(), 2000))
}

// listensOn reports whether `ss -Hltn` output has a socket listening on
// addr (host:port), or on the wildcard address at its port.
func listensOn(out []byte, addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if _, err := strconv.Atoi(port); err != nil {
		return false
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		switch f[3] {
		case addr, "0.0.0.0:" + port, "*:" + port, "[::]:" + port:
			return true
		}
	}
	return false
}
