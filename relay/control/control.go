// Package control serves a running iketcp instance's status over a unix
// socket and fetches it for `iketcp status`. Each instance has its own
// socket path, so several can run on one host.
//
// The protocol is one request line ("status") and a JSON reply, after
// which the server closes the connection.
package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

// requestTimeout bounds one control request, both ways.
const requestTimeout = 5 * time.Second

// DefaultDir is where instances put their sockets when not told: /run/iketcp
// for root, else $XDG_RUNTIME_DIR/iketcp, else a per-user directory in the
// system's temporary directory.
func DefaultDir() string {
	if os.Geteuid() == 0 {
		return "/run/iketcp"
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "iketcp")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("iketcp-%d", os.Geteuid()))
}

// DefaultPath is the socket of an instance of the given role ("server" or
// "client") when --control is not given.
func DefaultPath(role string) string { return filepath.Join(DefaultDir(), role+".sock") }

// Server answers status requests on a unix socket.
type Server struct {
	ln     net.Listener
	path   string
	status func() any
	log    *slog.Logger
	wg     sync.WaitGroup
	once   sync.Once
}

// Listen creates the socket at path (and its directory). A stale socket
// left by a crashed instance is replaced; one that a live instance still
// answers on is an error, so two instances never share a path.
func Listen(path string, status func() any, log *slog.Logger) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("control socket directory: %w (choose another path with --control)", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s is in use by another running iketcp: give this instance its own --control path", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("removing stale control socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w (choose another path with --control)", err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, err
	}
	s := &Server{ln: ln, path: path, status: status, log: log}
	s.wg.Add(1)
	go s.serve()
	return s, nil
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Close stops serving, removes the socket and waits for requests in flight.
func (s *Server) Close() error {
	var err error
	s.once.Do(func() {
		err = s.ln.Close()
		s.wg.Wait()
	})
	return err
}

func (s *Server) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.log.Warn("control socket accept failed", "err", err)
			}
			return
		}
		s.wg.Add(1)
		go s.answer(c)
	}
}

func (s *Server) answer(c net.Conn) {
	defer s.wg.Done()
	defer c.Close()
	c.SetDeadline(time.Now().Add(requestTimeout))
	line, err := bufio.NewReader(io.LimitReader(c, 256)).ReadString('\n')
	if err != nil {
		return
	}
	switch strings.TrimSpace(line) {
	case "status":
		enc := json.NewEncoder(c)
		enc.SetIndent("", "  ")
		if err := enc.Encode(s.status()); err != nil {
			s.log.Debug("control reply failed", "err", err)
		}
	default:
		fmt.Fprintf(c, "{\"error\": %q}\n", "unknown request; the only one is: status")
	}
}

// Fetch asks the instance at path for its status and returns the JSON.
func Fetch(ctx context.Context, path string) ([]byte, error) {
	var d net.Dialer
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("no iketcp instance answers on %s: %w", path, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if _, err := io.WriteString(c, "status\n"); err != nil {
		return nil, err
	}
	return io.ReadAll(io.LimitReader(c, 64<<20))
}

// Sockets lists the control sockets in dir, sorted.
func Sockets(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if e.Type()&os.ModeSocket != 0 {
			out = append(out, filepath.Join(dir, e.Name()))
		}
	}
	sort.Strings(out)
	return out, nil
}
