package server

import (
	"testing"
	"time"
)

// TestTableKeepsRecentRoutes: a full session's table makes room for a new
// SPI only by evicting one unused for recentUse; one that carried traffic
// recently is never pushed out.
func TestTableKeepsRecentRoutes(t *testing.T) {
	tab := table[uint32]{m: make(map[uint32]*route)}
	sess := &session{}
	t0 := time.Unix(1_000_000, 0)
	for i := range uint32(maxRouteKeys) {
		if tab.add(sess, &sess.espKeys, 100+i, t0) == nil {
			t.Fatalf("key %d refused below the bound", i)
		}
	}
	if tab.add(sess, &sess.espKeys, 1, t0.Add(time.Minute)) != nil {
		t.Fatal("a full table took a key while every key was recently used")
	}
	// All but key 100 carry traffic now; later, 100 is the one to go.
	later := t0.Add(recentUse + time.Minute)
	for _, k := range sess.espKeys[1:] {
		tab.m[k].touch(later.Unix())
	}
	if tab.add(sess, &sess.espKeys, 2, later) == nil {
		t.Fatal("a key unused for longer than recentUse did not make room")
	}
	if tab.m[100] != nil || tab.m[2] == nil || len(sess.espKeys) != maxRouteKeys {
		t.Fatalf("after eviction: key 100 %v, key 2 %v, %d keys", tab.m[100] != nil, tab.m[2] != nil, len(sess.espKeys))
	}
	if tab.add(sess, &sess.espKeys, 3, later) != nil {
		t.Fatal("a second key pushed out a recently used one")
	}
	other := &session{}
	if tab.add(other, &other.espKeys, 101, later) != nil {
		t.Fatal("a key that routes to another session was taken over")
	}
}
