package udpbatch

import (
	"bytes"
	"slices"
	"testing"
)

// dgram is datagram i of sender tag: three bytes that say so (where there
// is room), then a byte that depends on both.
func dgram(tag, i, size int) []byte {
	p := bytes.Repeat([]byte{byte(i*7 + tag)}, size)
	if size >= 3 {
		p[0], p[1], p[2] = byte(tag), byte(i>>8), byte(i)
	}
	return p
}

// splitAll splits buf[:n] at seg as ReadBatch does, and fails the test if
// the walk does not end within n+1 steps or does not move forward.
func splitAll(t *testing.T, buf []byte, n, seg int) [][]byte {
	t.Helper()
	var out [][]byte
	off := 0
	for step := 0; ; step++ {
		if step > len(buf)+1 {
			t.Fatalf("segment(len %d, n %d, seg %d): no end after %d datagrams", len(buf), n, seg, step)
		}
		d, next := segment(buf, n, seg, off)
		out = append(out, d)
		if next >= n || next >= len(buf) {
			return out
		}
		if next <= off {
			t.Fatalf("segment(len %d, n %d, seg %d, off %d): next %d does not move on", len(buf), n, seg, off, next)
		}
		off = next
	}
}

func TestSegment(t *testing.T) {
	buf := []byte("0123456789abcdef")
	for _, tc := range []struct {
		n, seg int
		want   []string
	}{
		{0, 0, []string{""}}, // an empty datagram is a datagram
		{0, 4, []string{""}}, // so is an empty message with a segment size
		{10, 0, []string{"0123456789"}},
		{10, -1, []string{"0123456789"}},
		{10, 3, []string{"012", "345", "678", "9"}}, // the last is shorter
		{9, 3, []string{"012", "345", "678"}},
		{10, 10, []string{"0123456789"}},
		{10, 11, []string{"0123456789"}},
		{10, 1, []string{"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"}},
		{99, 8, []string{"01234567", "89abcdef"}}, // n is clamped to the buffer
		{-5, 8, []string{""}},
	} {
		var got []string
		for _, d := range splitAll(t, buf, tc.n, tc.seg) {
			got = append(got, string(d))
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("segment(%q, n %d, seg %d) = %q, want %q", buf, tc.n, tc.seg, got, tc.want)
		}
	}
	if d, next := segment(buf, 10, 3, 99); len(d) != 0 || next != 10 {
		t.Errorf("off past n: %q, %d; want empty, 10", d, next)
	}
}

// FuzzSegment: the datagrams of a message put back together are the
// message; all but the last are seg bytes long and the last is not
// longer; and there are as many as seg divides n into.
func FuzzSegment(f *testing.F) {
	f.Add([]byte("0123456789"), 10, 3)
	f.Add([]byte("0123456789"), 9, 3)
	f.Add([]byte{}, 0, 0)
	f.Add(bytes.Repeat([]byte{7}, 1400*3+5), 1400*3+5, 1400)
	f.Add([]byte("x"), 5, -1)
	f.Fuzz(func(t *testing.T, buf []byte, n, seg int) {
		parts := splitAll(t, buf, n, seg)
		m := max(0, min(n, len(buf)))
		if got := bytes.Join(parts, nil); !bytes.Equal(got, buf[:m]) {
			t.Fatalf("n %d seg %d: the datagrams make %d bytes, not the message's %d", n, seg, len(got), m)
		}
		want := 1
		if seg > 0 && m > seg {
			want = (m + seg - 1) / seg
		}
		if len(parts) != want {
			t.Fatalf("n %d seg %d: %d datagrams, want %d", m, seg, len(parts), want)
		}
		for i, p := range parts[:len(parts)-1] {
			if len(p) != seg {
				t.Fatalf("n %d seg %d: datagram %d of %d is %d bytes", m, seg, i, len(parts), len(p))
			}
		}
		if last := parts[len(parts)-1]; seg > 0 && len(parts) > 1 && (len(last) == 0 || len(last) > seg) {
			t.Fatalf("n %d seg %d: the last datagram is %d bytes", m, seg, len(last))
		}
	})
}
