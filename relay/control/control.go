// Package control serves a running iketcp instance's status over a unix
// socket and fetches it for `iketcp status`. Each instance has its own
// socket path, so several can run on one host.
//
// The protocol is one request line and a JSON reply, after which the
// server closes the connection. Every instance answers "status"; an
// instance may answer more (Request): a server answers "upgrade".
//
// Both ends trust only what no other local user can have made: the
// socket's directory must be a directory, not a symlink, owned by the
// effective uid and writable by no one else; Listen creates it with mode
// 0700 when it is missing and the socket with mode 0600. Fetch and Sockets
// also refuse a socket not owned by the effective uid, and Fetch (on Linux)
// one served by a process of another uid. Each refusal says what is wrong
// and what to do.
package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
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
	more   []Request
	log    *slog.Logger
	wg     sync.WaitGroup
	once   sync.Once
}

// Listen creates the socket at path, and its directory if that does not
// exist yet (mode 0700; only the last element is created, its parent must
// exist). The directory must be private: a directory, not a symlink, owned
// by the effective uid and writable by no one else. The socket is created
// with mode 0600. A stale socket left by a crashed instance is replaced;
// one that a live instance still answers on is an error, so two instances
// never share a path, and so is anything at path that is not a socket.
//
// more are the requests it answers besides "status".
func Listen(path string, status func() any, log *slog.Logger, more ...Request) (*Server, error) {
	dir := filepath.Dir(path)
	if err := makeDir(dir, log); err != nil {
		return nil, err
	}
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	if err := removeStale(path, log); err != nil {
		return nil, err
	}
	ln, err := listenPrivate(path, log)
	if err != nil {
		return nil, err
	}
	s := &Server{ln: ln, path: path, status: status, more: more, log: log}
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
	name := strings.TrimSpace(line)
	answer := s.status
	if name != "status" {
		answer = nil
		for _, r := range s.more {
			if r.Name == name {
				answer = r.Answer
			}
		}
	}
	if answer == nil {
		names := []string{"status"}
		for _, r := range s.more {
			names = append(names, r.Name)
		}
		fmt.Fprintf(c, "{\"error\": %q}\n", "unknown request; this instance answers: "+strings.Join(names, ", "))
		return
	}
	enc := json.NewEncoder(c)
	enc.SetIndent("", "  ")
	if err := enc.Encode(answer()); err != nil {
		s.log.Debug("control reply failed", "err", err)
	}
}

// Request is a request an instance answers besides "status": Answer's
// result is the JSON reply. Requests must be names of one word.
type Request struct {
	Name   string
	Answer func() any
}

// Fetch asks the instance at path for its status and returns the JSON.
// Before it says anything it checks that the socket can only be ours: its
// directory passes the checks Listen makes, the socket is owned by the
// effective uid, and (on Linux) the process answering on it runs as the
// effective uid.
func Fetch(ctx context.Context, path string) ([]byte, error) { return Ask(ctx, path, "status") }

// Ask sends the instance at path the request name, after the checks Fetch
// makes, and returns the JSON reply.
func Ask(ctx context.Context, path, name string) ([]byte, error) {
	if err := checkDir(filepath.Dir(path)); err != nil {
		return nil, err
	}
	if err := checkSocket(path); err != nil {
		return nil, err
	}
	var d net.Dialer
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("no iketcp instance answers on %s: %w", path, err)
	}
	defer c.Close()
	if err := checkPeer(c, path); err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if _, err := io.WriteString(c, name+"\n"); err != nil {
		return nil, err
	}
	return io.ReadAll(io.LimitReader(c, 64<<20))
}

// Sockets lists the control sockets in dir, sorted. The directory must
// pass the checks Listen makes, and every socket in it must be owned by the
// effective uid; an error names the first thing that does not. A missing
// dir is an error that wraps fs.ErrNotExist.
func Sockets(dir string) ([]string, error) {
	if err := checkDir(dir); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if e.Type()&fs.ModeSocket == 0 {
			continue
		}
		path := filepath.Join(dir, e.Name())
		fi, err := e.Info() // of the entry itself, like e.Type(): symlinks were skipped
		if err != nil {
			return nil, err
		}
		if err := checkOwner("control socket", path, fi); err != nil {
			return nil, err
		}
		out = append(out, path)
	}
	sort.Strings(out)
	return out, nil
}
