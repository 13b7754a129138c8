// Package statefile is the file in which `iketcp server --state PATH`
// keeps its session table across a restart: the format, its checks, and
// the atomic write. It knows nothing of sockets or links; package
// relay/server fills a Table from its sessions and rebuilds them from one.
//
// The file holds secrets (each session's ticket key, with which a client
// proves it owns the session), so Write creates it with mode 0600 and Read
// refuses one that group or others may read.
//
// On disk:
//
//	iketcp-state 1 <SHA-256 of the body, hex>\n
//	<body: a Table as JSON>
//
// The checksum catches truncation and torn or corrupt files, which Read
// reports as ErrCorrupt. A reader ignores fields it does not know, so a
// later version may add fields (an aggregate's members, say) that older
// readers can do without; one that changes what a field means changes the
// version instead, and an older reader then reports ErrVersion.
package statefile

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"time"
)

// Version is the format version Write writes and Decode accepts.
const Version = 1

// magic starts every state file.
const magic = "iketcp-state"

// Bounds on what Decode accepts, well beyond what a server holds, so
// that a corrupt file cannot make the reader allocate without limit.
const (
	MaxSessions    = 1 << 16
	MaxKeys        = 64 // per session and kind, as relay/server's routes
	MaxFileSize    = 64 << 20
	maxStringField = 1024
)

// Errors Read and Decode return, wrapped with what was wrong. Each says
// why the file was ignored.
var (
	ErrCorrupt = errors.New("state file is corrupt")
	ErrVersion = errors.New("state file is of another format version")
	ErrForeign = errors.New("state file belongs to another configuration")
	ErrStale   = errors.New("state file is stale")
	ErrUnsafe  = errors.New("state file is readable by others")
)

// Table is a server's session table.
type Table struct {
	// Config says which server wrote the file: its listen addresses and
	// backend. A server restores only a table of its own Config.
	Config string `json:"config"`
	// Written is when the table was taken.
	Written time.Time `json:"written"`
	// NextSession is the highest session ID the server has given out:
	// new sessions continue after it, so no ID is reused.
	NextSession uint64    `json:"next_session"`
	Sessions    []Session `json:"sessions"`
}

// Session is one session: an IKE SA and the SAs rekeyed from it.
type Session struct {
	ID uint64 `json:"id"`
	// Source is the per-source limits' view of its client (a prefix).
	Source netip.Prefix `json:"source"`
	// Owner is the identity of the client that opened it, over TLS with
	// a client certificate; empty otherwise.
	Owner   string    `json:"owner,omitempty"`
	Created time.Time `json:"created"`
	// LastActive is the last frame from its client, or its disconnect.
	LastActive time.Time `json:"last_active"`
	// Local is its socket toward the backend: the peer the daemon sees,
	// whose port a restarted server binds again.
	Local netip.AddrPort `json:"local"`
	IKE   []IKERoute     `json:"ike"`
	ESP   []uint32       `json:"esp"`
	// Key is the session's ticket key, when an iketcp client holds a
	// ticket for it: a secret.
	Key []byte `json:"key,omitempty"`
}

// IKERoute is an IKE SA of a session, by its initiator's SPI, with the
// highest message ID of the requests its client has sent (Requests says
// whether there was any), so that a replayed request is still known as
// one after a restart.
type IKERoute struct {
	SPI      uint64 `json:"spi"`
	MaxReq   uint32 `json:"max_req"`
	Requests bool   `json:"requests"`
}

// KeySize is the size of a session's ticket key.
const KeySize = 32

// Encode returns the file's bytes for t.
func Encode(t *Table) ([]byte, error) {
	body, err := json.Marshal(t)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(body)
	out := make([]byte, 0, len(magic)+len(body)+80)
	out = fmt.Appendf(out, "%s %d %s\n", magic, Version, hex.EncodeToString(sum[:]))
	return append(out, body...), nil
}

// Decode parses and checks a state file's bytes. It does not judge the
// table's age or configuration: Check does.
func Decode(b []byte) (*Table, error) {
	nl := bytes.IndexByte(b, '\n')
	if nl < 0 || nl > 128 {
		return nil, fmt.Errorf("%w: no header line", ErrCorrupt)
	}
	var version int
	var sumHex string
	if _, err := fmt.Sscanf(string(b[:nl]), magic+" %d %s", &version, &sumHex); err != nil {
		return nil, fmt.Errorf("%w: header %q", ErrCorrupt, b[:min(nl, 40)])
	}
	if version != Version {
		return nil, fmt.Errorf("%w: %d, this iketcp reads %d", ErrVersion, version, Version)
	}
	body := b[nl+1:]
	sum := sha256.Sum256(body)
	if want, err := hex.DecodeString(sumHex); err != nil || !bytes.Equal(want, sum[:]) {
		return nil, fmt.Errorf("%w: checksum mismatch (truncated or damaged)", ErrCorrupt)
	}
	var t Table
	if err := json.Unmarshal(body, &t); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	if err := t.validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	return &t, nil
}

// validate checks what a restore relies on: bounded sizes, unique IDs,
// ports and SPIs, keys of the right size.
func (t *Table) validate() error {
	if len(t.Sessions) > MaxSessions {
		return fmt.Errorf("%d sessions, more than %d", len(t.Sessions), MaxSessions)
	}
	if len(t.Config) > maxStringField {
		return errors.New("config too long")
	}
	ids := make(map[uint64]bool, len(t.Sessions))
	locals := make(map[netip.AddrPort]bool, len(t.Sessions))
	ike := make(map[uint64]bool)
	esp := make(map[uint32]bool)
	for i := range t.Sessions {
		s := &t.Sessions[i]
		switch {
		case s.ID == 0 || s.ID > t.NextSession:
			return fmt.Errorf("session ID %d (next %d)", s.ID, t.NextSession)
		case ids[s.ID]:
			return fmt.Errorf("session ID %d twice", s.ID)
		case !s.Local.IsValid() || s.Local.Port() == 0:
			return fmt.Errorf("session %d: backend socket %v", s.ID, s.Local)
		case locals[s.Local]:
			return fmt.Errorf("session %d: backend socket %v twice", s.ID, s.Local)
		case !s.Source.IsValid():
			return fmt.Errorf("session %d: no source", s.ID)
		case len(s.Owner) > maxStringField:
			return fmt.Errorf("session %d: owner too long", s.ID)
		case len(s.Key) != 0 && len(s.Key) != KeySize:
			return fmt.Errorf("session %d: key of %d bytes", s.ID, len(s.Key))
		case len(s.IKE) == 0 || len(s.IKE) > MaxKeys || len(s.ESP) > MaxKeys:
			return fmt.Errorf("session %d: %d IKE SAs and %d ESP SPIs", s.ID, len(s.IKE), len(s.ESP))
		}
		ids[s.ID], locals[s.Local] = true, true
		for _, r := range s.IKE {
			if r.SPI == 0 || ike[r.SPI] {
				return fmt.Errorf("session %d: IKE SPI %016x zero or twice", s.ID, r.SPI)
			}
			ike[r.SPI] = true
		}
		for _, spi := range s.ESP {
			if spi < 256 || esp[spi] { // 0-255 are reserved (RFC 4303 2.1)
				return fmt.Errorf("session %d: ESP SPI %08x reserved or twice", s.ID, spi)
			}
			esp[spi] = true
		}
	}
	return nil
}

// Check judges a decoded table for a server of configuration config whose
// sessions wait idle for their clients: one of another configuration is
// ErrForeign, one written more than idle ago (every session in it has
// expired) or in the future is ErrStale.
func (t *Table) Check(config string, idle time.Duration, now time.Time) error {
	if t.Config != config {
		return fmt.Errorf("%w: written for %q, this server is %q", ErrForeign, t.Config, config)
	}
	age := now.Sub(t.Written)
	if age > idle {
		return fmt.Errorf("%w: written %v ago, longer than the sessions' idle timeout %v", ErrStale, age.Round(time.Second), idle)
	}
	if age < -time.Minute {
		return fmt.Errorf("%w: written %v in the future", ErrStale, (-age).Round(time.Second))
	}
	return nil
}

// Read reads and decodes the state file at path. A missing file is
// fs.ErrNotExist (a first start); one that group or others may read is
// ErrUnsafe, as its secrets may have leaked.
func Read(path string) (*Table, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: not a regular file", ErrCorrupt)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%w: mode %v, want 0600", ErrUnsafe, fi.Mode().Perm())
	}
	b, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, err
	}
	if len(b) > MaxFileSize {
		return nil, fmt.Errorf("%w: larger than %d bytes", ErrCorrupt, MaxFileSize)
	}
	return Decode(b)
}

// Write replaces the state file at path with t, atomically: it writes a
// temporary file (mode 0600) beside it, syncs it, renames it over path
// and syncs the directory. A crash at any point leaves the old file or
// the new one, never a mixture.
func Write(path string, t *Table) error {
	b, err := Encode(t)
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(0o600); err != nil { // CreateTemp's is 0600 already; umask aside
		return err
	}
	if _, err := f.Write(b); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	ok = true
	if d, err := os.Open(dir); err == nil {
		err = d.Sync()
		d.Close()
		if err != nil && !errors.Is(err, fs.ErrInvalid) {
			return fmt.Errorf("sync %s: %w", dir, err)
		}
	}
	return nil
}
