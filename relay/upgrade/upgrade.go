// Package upgrade is the hand-over between a running iketcp server and
// the fresh copy of its binary that replaces it (a planned restart, or an
// upgrade to a new binary), as HAProxy and Envoy do their hot restarts:
// the old process starts the new one with one end of a unix socket pair
// (SOCK_SEQPACKET) as file descriptor 3, named by IKETCP_UPGRADE_FD; the
// new one says when it is ready; the old one sends it a payload (what the
// server hands over, package relay/server) and the file descriptors it
// indexes (listening sockets, backend sockets, live connections) with
// SCM_RIGHTS; the new one says when it has taken over, and the old one
// exits.
//
// It knows nothing of what the payload means. Messages, one per packet:
//
//	'R'                              new -> old: ready to take over
//	'H' len(8) files(4)              old -> new: the payload's size and the number of files
//	'P' bytes                        old -> new: the payload, in chunks
//	'F' + SCM_RIGHTS                 old -> new: files, at most maxFilesPerMsg a packet
//	'O'                              new -> old: taken over
//	'X' reason                       new -> old: failed
package upgrade

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// EnvFD names the environment variable that tells a new process the file
// descriptor of its hand-over socket.
const EnvFD = "IKETCP_UPGRADE_FD"

const (
	maxFilesPerMsg = 200 // below SCM_MAX_FD (253)
	chunkSize      = 32 << 10
	maxPayload     = 256 << 20
	maxFiles       = 1 << 20
)

const (
	msgReady   = 'R'
	msgHeader  = 'H'
	msgPayload = 'P'
	msgFiles   = 'F'
	msgOK      = 'O'
	msgFailed  = 'X'
)

// Successor is the old process's handle on the new one.
type Successor struct {
	cmd    *exec.Cmd
	sock   *net.UnixConn
	exited chan struct{}
	err    error // the new process's exit, once exited is closed
}

// Start starts binary with args (the old process's own, without the
// program name), its output on stdout and stderr, and the hand-over
// socket as file descriptor 3.
func Start(binary string, args []string, stdout, stderr *os.File) (*Successor, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, os.NewSyscallError("socketpair", err)
	}
	mine, theirs := os.NewFile(uintptr(fds[0]), "upgrade-old"), os.NewFile(uintptr(fds[1]), "upgrade-new")
	defer theirs.Close()
	sock, err := fileUnixConn(mine)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(binary, args...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.ExtraFiles = []*os.File{theirs} // fd 3
	cmd.Env = append(os.Environ(), EnvFD+"=3")
	if err := cmd.Start(); err != nil {
		sock.Close()
		return nil, fmt.Errorf("starting %s: %w", binary, err)
	}
	s := &Successor{cmd: cmd, sock: sock, exited: make(chan struct{})}
	go func() {
		s.err = cmd.Wait()
		close(s.exited)
	}()
	return s, nil
}

// PID is the new process's.
func (s *Successor) PID() int { return s.cmd.Process.Pid }

// WaitReady waits until the new process says it is ready, or fails.
func (s *Successor) WaitReady(timeout time.Duration) error {
	b, err := s.read(timeout)
	if err != nil {
		return err
	}
	if len(b) != 1 || b[0] != msgReady {
		return fmt.Errorf("the new process said %q, not ready", b)
	}
	return nil
}

// Send sends the payload and the files.
func (s *Successor) Send(payload []byte, files []*os.File) error {
	if len(payload) > maxPayload || len(files) > maxFiles {
		return fmt.Errorf("hand-over of %d bytes and %d files is too large", len(payload), len(files))
	}
	s.sock.SetWriteDeadline(time.Now().Add(30 * time.Second))
	defer s.sock.SetWriteDeadline(time.Time{})
	hdr := []byte{msgHeader}
	hdr = binary.BigEndian.AppendUint64(hdr, uint64(len(payload)))
	hdr = binary.BigEndian.AppendUint32(hdr, uint32(len(files)))
	if _, err := s.sock.Write(hdr); err != nil {
		return s.failed(err)
	}
	for len(payload) > 0 {
		n := min(len(payload), chunkSize)
		if _, err := s.sock.Write(append([]byte{msgPayload}, payload[:n]...)); err != nil {
			return s.failed(err)
		}
		payload = payload[n:]
	}
	for len(files) > 0 {
		batch := files[:min(len(files), maxFilesPerMsg)]
		files = files[len(batch):]
		fds := make([]int, len(batch))
		for i, f := range batch {
			fds[i] = int(f.Fd())
		}
		if _, _, err := s.sock.WriteMsgUnix([]byte{msgFiles}, unix.UnixRights(fds...), nil); err != nil {
			return s.failed(err)
		}
	}
	return nil
}

// WaitTakenOver waits until the new process says it has taken over.
func (s *Successor) WaitTakenOver(timeout time.Duration) error {
	b, err := s.read(timeout)
	if err != nil {
		return err
	}
	switch {
	case len(b) == 1 && b[0] == msgOK:
		return nil
	case len(b) > 0 && b[0] == msgFailed:
		return fmt.Errorf("the new process failed to take over: %s", b[1:])
	}
	return fmt.Errorf("the new process said %q, not taken over", b)
}

// Release lets the new process run on its own: the old one no longer
// waits for it, and it is re-parented when the old one exits.
func (s *Successor) Release() {
	s.sock.Close()
}

// Kill ends a new process that did not take over, by its PID, and reaps it.
func (s *Successor) Kill() {
	s.sock.Close()
	s.cmd.Process.Kill()
	select {
	case <-s.exited:
	case <-time.After(5 * time.Second):
	}
}

// read reads one message within timeout; the new process's exit or
// silence is an error that says so.
func (s *Successor) read(timeout time.Duration) ([]byte, error) {
	s.sock.SetReadDeadline(time.Now().Add(timeout))
	defer s.sock.SetReadDeadline(time.Time{})
	buf := make([]byte, 4096)
	n, err := s.sock.Read(buf)
	if err != nil {
		return nil, s.failed(err)
	}
	return buf[:n], nil
}

// failed explains an error on the socket: mostly, the new process exited.
func (s *Successor) failed(err error) error {
	select {
	case <-s.exited:
		return fmt.Errorf("the new process (pid %d) exited: %v", s.PID(), s.err)
	case <-time.After(100 * time.Millisecond):
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("the new process (pid %d) did not answer in time", s.PID())
	}
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("the new process (pid %d) closed the hand-over socket", s.PID())
	}
	return fmt.Errorf("hand-over socket: %w", err)
}

// Predecessor is the new process's handle on the old one.
type Predecessor struct {
	sock *net.UnixConn
}

// Inherited returns the hand-over from the old process, or nil if this
// process was not started for one. It removes EnvFD from the environment,
// so that no process this one starts believes it was.
func Inherited() (*Predecessor, error) {
	v, ok := os.LookupEnv(EnvFD)
	if !ok {
		return nil, nil
	}
	os.Unsetenv(EnvFD)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("%s=%q: not a file descriptor", EnvFD, v)
	}
	unix.CloseOnExec(fd)
	sock, err := fileUnixConn(os.NewFile(uintptr(fd), "upgrade-new"))
	if err != nil {
		return nil, fmt.Errorf("%s=%d: %w", EnvFD, fd, err)
	}
	return &Predecessor{sock: sock}, nil
}

// Ready tells the old process to hand over.
func (p *Predecessor) Ready() error {
	_, err := p.sock.Write([]byte{msgReady})
	return err
}

// Receive reads the payload and the files, within timeout.
func (p *Predecessor) Receive(timeout time.Duration) (payload []byte, files []*os.File, err error) {
	p.sock.SetReadDeadline(time.Now().Add(timeout))
	defer p.sock.SetReadDeadline(time.Time{})
	defer func() {
		if err != nil {
			for _, f := range files {
				f.Close()
			}
			files = nil
		}
	}()
	buf := make([]byte, 1+chunkSize)
	n, err := p.sock.Read(buf)
	if err != nil {
		return nil, nil, err
	}
	if n != 13 || buf[0] != msgHeader {
		return nil, nil, fmt.Errorf("hand-over: expected the header, got %d bytes", n)
	}
	size, count := binary.BigEndian.Uint64(buf[1:]), binary.BigEndian.Uint32(buf[9:])
	if size > maxPayload || count > maxFiles {
		return nil, nil, fmt.Errorf("hand-over of %d bytes and %d files is too large", size, count)
	}
	payload = make([]byte, 0, size)
	for uint64(len(payload)) < size {
		n, err := p.sock.Read(buf)
		if err != nil {
			return nil, nil, err
		}
		if n < 1 || buf[0] != msgPayload || uint64(len(payload)+n-1) > size {
			return nil, nil, errors.New("hand-over: malformed payload")
		}
		payload = append(payload, buf[1:n]...)
	}
	oob := make([]byte, unix.CmsgSpace(maxFilesPerMsg*4))
	for uint32(len(files)) < count {
		n, oobn, _, _, err := p.sock.ReadMsgUnix(buf[:1], oob)
		if err != nil {
			return nil, files, err
		}
		msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
		for _, m := range msgs {
			fds, err := unix.ParseUnixRights(&m)
			if err != nil {
				continue
			}
			for _, fd := range fds {
				files = append(files, os.NewFile(uintptr(fd), "iketcp-inherited"))
			}
		}
		if n != 1 || buf[0] != msgFiles || perr != nil {
			return nil, files, errors.New("hand-over: malformed files message")
		}
	}
	if uint32(len(files)) != count {
		return nil, files, fmt.Errorf("hand-over: %d files, want %d", len(files), count)
	}
	return payload, files, nil
}

// TakenOver tells the old process to go.
func (p *Predecessor) TakenOver() error {
	_, err := p.sock.Write([]byte{msgOK})
	p.sock.Close()
	return err
}

// Failed tells the old process that this one could not take over.
func (p *Predecessor) Failed(reason error) {
	p.sock.Write(append([]byte{msgFailed}, reason.Error()...))
	p.sock.Close()
}

// fileUnixConn makes a net.UnixConn of f, which it closes.
func fileUnixConn(f *os.File) (*net.UnixConn, error) {
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, errors.New("not a unix socket")
	}
	return uc, nil
}
