package statefile

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"
)

const config = "rfc9329 203.0.113.2:4500 -> 127.0.0.1:4500"

func sample() *Table {
	now := time.Date(2026, 12, 1, 6, 0, 0, 0, time.UTC)
	return &Table{
		Config:      config,
		Written:     now,
		NextSession: 7,
		Sessions: []Session{
			{
				ID: 3, Source: netip.MustParsePrefix("203.0.113.1/32"), Created: now.Add(-time.Hour), LastActive: now,
				Local: netip.MustParseAddrPort("127.0.0.1:52672"),
				IKE:   []IKERoute{{SPI: 0xfbb63d9879e3dd86, MaxReq: 9, Requests: true}, {SPI: 0x1122334455667788}},
				ESP:   []uint32{0x630947d5, 0xc0000001},
				Key:   bytes.Repeat([]byte{0xab}, KeySize),
			},
			{
				ID: 7, Source: netip.MustParsePrefix("2001:db8::/64"), Owner: "CN=site", Created: now, LastActive: now,
				Local: netip.MustParseAddrPort("[::1]:40000"),
				IKE:   []IKERoute{{SPI: 1}},
			},
		},
	}
}

func TestRoundTrip(t *testing.T) {
	in := sample()
	b, err := Encode(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Fatalf("round trip:\n in %+v\nout %+v", in, out)
	}
	if err := out.Check(config, 5*time.Minute, in.Written.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
}

// TestCorrupt: every way a file can be damaged is ErrCorrupt (or
// ErrVersion), never a panic and never a table.
func TestCorrupt(t *testing.T) {
	good, err := Encode(sample())
	if err != nil {
		t.Fatal(err)
	}
	// reseal recomputes the checksum after changing the body, so that the
	// body's own checks are what refuses it.
	reseal := func(edit func(*Table)) []byte {
		tb := sample()
		edit(tb)
		b, err := Encode(tb)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	flipped := bytes.Clone(good)
	flipped[len(flipped)-10] ^= 0x20
	nl := bytes.IndexByte(good, '\n')
	cases := []struct {
		name string
		b    []byte
		want error
	}{
		{"empty", nil, ErrCorrupt},
		{"no newline", []byte("iketcp-state 1 abc"), ErrCorrupt},
		{"other magic", append([]byte("other-state 1 00\n"), good[nl+1:]...), ErrCorrupt},
		{"truncated", good[:len(good)-5], ErrCorrupt},
		{"bit flipped", flipped, ErrCorrupt},
		{"bad checksum hex", append([]byte("iketcp-state 1 zz\n"), good[nl+1:]...), ErrCorrupt},
		{"version 2", append([]byte(strings.Replace(string(good[:nl+1]), "iketcp-state 1", "iketcp-state 2", 1)), good[nl+1:]...), ErrVersion},
		{"not json", seal([]byte("{not json")), ErrCorrupt},
		{"wrong types", seal([]byte(`{"sessions":"x"}`)), ErrCorrupt},
		{"zero id", reseal(func(tb *Table) { tb.Sessions[0].ID = 0 }), ErrCorrupt},
		{"id beyond next", reseal(func(tb *Table) { tb.NextSession = 3 }), ErrCorrupt},
		{"duplicate id", reseal(func(tb *Table) { tb.Sessions[1].ID = 3 }), ErrCorrupt},
		{"port zero", reseal(func(tb *Table) { tb.Sessions[0].Local = netip.MustParseAddrPort("127.0.0.1:0") }), ErrCorrupt},
		{"no local", reseal(func(tb *Table) { tb.Sessions[0].Local = netip.AddrPort{} }), ErrCorrupt},
		{"duplicate local", reseal(func(tb *Table) { tb.Sessions[1].Local = tb.Sessions[0].Local }), ErrCorrupt},
		{"no source", reseal(func(tb *Table) { tb.Sessions[0].Source = netip.Prefix{} }), ErrCorrupt},
		{"short key", reseal(func(tb *Table) { tb.Sessions[0].Key = []byte{1, 2, 3} }), ErrCorrupt},
		{"no IKE SA", reseal(func(tb *Table) { tb.Sessions[1].IKE = nil }), ErrCorrupt},
		{"IKE SPI zero", reseal(func(tb *Table) { tb.Sessions[1].IKE[0].SPI = 0 }), ErrCorrupt},
		{"IKE SPI twice", reseal(func(tb *Table) { tb.Sessions[1].IKE[0].SPI = tb.Sessions[0].IKE[0].SPI }), ErrCorrupt},
		{"ESP SPI reserved", reseal(func(tb *Table) { tb.Sessions[0].ESP[0] = 0xfe }), ErrCorrupt},
		{"ESP SPI twice", reseal(func(tb *Table) { tb.Sessions[1].ESP = []uint32{tb.Sessions[0].ESP[0]} }), ErrCorrupt},
		{"too many SPIs", reseal(func(tb *Table) {
			for i := range MaxKeys + 1 {
				tb.Sessions[1].ESP = append(tb.Sessions[1].ESP, uint32(0x10000+i))
			}
		}), ErrCorrupt},
		{"long owner", reseal(func(tb *Table) { tb.Sessions[1].Owner = strings.Repeat("x", maxStringField+1) }), ErrCorrupt},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tb, err := Decode(c.b)
			if !errors.Is(err, c.want) || tb != nil {
				t.Fatalf("Decode = %v, %v; want %v", tb, err, c.want)
			}
		})
	}
}

// seal puts a valid header, checksum included, in front of body.
func seal(body []byte) []byte {
	sum := sha256.Sum256(body)
	return append(fmt.Appendf(nil, "iketcp-state %d %s\n", Version, hex.EncodeToString(sum[:])), body...)
}

func TestCheck(t *testing.T) {
	tb := sample()
	idle := 5 * time.Minute
	cases := []struct {
		name   string
		config string
		now    time.Time
		want   error
	}{
		{"fresh", config, tb.Written.Add(idle - time.Second), nil},
		{"other backend", "rfc9329 203.0.113.2:4500 -> 127.0.0.1:4501", tb.Written, ErrForeign},
		{"other listen", "rfc9329 203.0.113.2:443 -> 127.0.0.1:4500", tb.Written, ErrForeign},
		{"older than idle", config, tb.Written.Add(idle + time.Second), ErrStale},
		{"from the future", config, tb.Written.Add(-time.Hour), ErrStale},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := tb.Check(c.config, idle, c.now); !errors.Is(err, c.want) || (c.want == nil) != (err == nil) {
				t.Fatalf("Check = %v, want %v", err, c.want)
			}
		})
	}
}

func TestWriteRead(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state")
	if _, err := Read(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Read of a missing file: %v", err)
	}
	old := syscall.Umask(0) // Write must not depend on the umask for 0600
	defer syscall.Umask(old)
	tb := sample()
	for range 2 { // the second replaces the first
		if err := Write(path, tb); err != nil {
			t.Fatal(err)
		}
		tb.NextSession++
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("state file mode %v, want 0600", fi.Mode().Perm())
	}
	got, err := Read(path)
	if err != nil {
		t.Fatal(err)
	}
	if got.NextSession != 8 {
		t.Fatalf("read back next session %d, want the second write's 8", got.NextSession)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("directory holds %d entries after two writes, want only the state file", len(entries))
	}

	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(path); !errors.Is(err, ErrUnsafe) {
		t.Fatalf("Read of a 0644 file: %v, want ErrUnsafe", err)
	}
	if _, err := Read(dir); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Read of a directory: %v, want ErrCorrupt", err)
	}
	if err := Write(filepath.Join(dir, "missing", "state"), tb); err == nil {
		t.Fatal("Write into a missing directory succeeded")
	}
}

// FuzzDecode: Decode never panics, and what it accepts encodes and
// decodes to the same table. Each input is tried as a whole file and, so
// that the checksum does not shield the body's checks, as a body sealed
// with a valid header.
func FuzzDecode(f *testing.F) {
	good, _ := Encode(sample())
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte("iketcp-state 1 00\n{}"))
	f.Add(seal([]byte(`{"next_session":1,"sessions":[{"id":1,"source":"192.0.2.1/32","local":"127.0.0.1:1","ike":[{"spi":1}]}]}`)))
	f.Add([]byte(`{"next_session":1,"sessions":[{"id":1,"source":"192.0.2.1/32","local":"127.0.0.1:1","ike":[{"spi":1}]}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		decodeOne(t, b)
		decodeOne(t, seal(b))
	})
}

func decodeOne(t *testing.T, b []byte) {
	tb, err := Decode(b)
	if err != nil {
		if tb != nil {
			t.Fatal("table with an error")
		}
		return
	}
	again, err := Encode(tb)
	if err != nil {
		t.Fatal(err)
	}
	tb2, err := Decode(again)
	if err != nil || !reflect.DeepEqual(tb, tb2) {
		t.Fatalf("re-encoded table does not decode the same: %v", err)
	}
}
