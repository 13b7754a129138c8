package server

import (
	"sync/atomic"
	"time"
)

const (
	// maxRouteKeys bounds the SPIs of each kind that route to one
	// session. Rekeying adds SPIs for as long as a session lives; past
	// the bound, a new SPI takes the place of the one unused longest, but
	// only of one unused for recentUse: an SPI that carried traffic
	// recently is never evicted, and a new one is refused instead.
	maxRouteKeys = 64
	recentUse    = 2 * time.Minute
	// A session learns new SPIs (a child SA's, a rekeyed IKE SA's) from
	// the connection that carries it, learnBurst at once and learnRate a
	// second after: rekeys come one at a time, SPI guesses by the
	// million.
	learnBurst = 32
	learnRate  = 1.0
)

// route is one SPI's way to its session.
type route struct {
	sess *session
	used atomic.Int64 // unix seconds of the last frame that took it

	// IKE routes, guarded by Server.mu: the highest message ID of the
	// requests the client side has sent in this IKE SA. A request beyond
	// it is fresh: the backend answers one only if it is authentic.
	maxReq uint32
	anyReq bool
}

// touch records that a frame took r at unix second now.
func (r *route) touch(now int64) {
	if r.used.Load() != now {
		r.used.Store(now)
	}
}

// request notes a request from the client side with message ID id, and
// reports whether it is fresh: beyond every request seen in the IKE SA,
// so not a retransmission or a replay. Server.mu must be held.
func (r *route) request(id uint32) bool {
	fresh := !r.anyReq || id > r.maxReq
	if fresh {
		r.maxReq, r.anyReq = id, true
	}
	return fresh
}

// routes finds sessions by the SPIs their frames carry: IKE SAs by the
// initiator's SPI, ESP by the SPI of ESP that arrives from clients.
// Guarded by Server.mu.
type routes struct {
	ike table[uint64]
	esp table[uint32]
}

func newRoutes() routes {
	return routes{ike: table[uint64]{m: make(map[uint64]*route)}, esp: table[uint32]{m: make(map[uint32]*route)}}
}

// drop removes every route to sess.
func (r *routes) drop(sess *session) {
	r.ike.drop(sess, sess.ikeKeys)
	r.esp.drop(sess, sess.espKeys)
}

// table maps SPIs of one kind to sessions. Each session records its keys
// of the kind in a slice of its own (keys).
type table[K comparable] struct {
	m map[K]*route
}

// add makes key route to sess and records it in sess's keys, unless key
// routes elsewhere already or sess holds maxRouteKeys keys that all
// carried traffic within recentUse; then it returns nil.
func (t *table[K]) add(sess *session, keys *[]K, key K, now time.Time) *route {
	if t.m[key] != nil {
		return nil
	}
	if len(*keys) >= maxRouteKeys && !t.evictStale(sess, keys, now) {
		return nil
	}
	r := &route{sess: sess}
	r.used.Store(now.Unix())
	t.m[key] = r
	*keys = append(*keys, key)
	return r
}

// evictStale removes sess's key unused longest, if it has been unused for
// recentUse, and reports whether it did.
func (t *table[K]) evictStale(sess *session, keys *[]K, now time.Time) bool {
	oldest, at := -1, now.Unix()
	for i, k := range *keys {
		if r := t.m[k]; r == nil || r.sess != sess {
			oldest, at = i, 0 // no longer ours: free to go
			break
		} else if u := r.used.Load(); u < at {
			oldest, at = i, u
		}
	}
	if oldest < 0 || now.Unix()-at < int64(recentUse/time.Second) {
		return false
	}
	if r := t.m[(*keys)[oldest]]; r != nil && r.sess == sess {
		delete(t.m, (*keys)[oldest])
	}
	*keys = append((*keys)[:oldest], (*keys)[oldest+1:]...)
	return true
}

// forget removes key from sess's keys and the table, if it routes there.
func (t *table[K]) forget(sess *session, keys *[]K, key K) {
	if r := t.m[key]; r != nil && r.sess == sess {
		delete(t.m, key)
	}
	for i, k := range *keys {
		if k == key {
			*keys = append((*keys)[:i], (*keys)[i+1:]...)
			break
		}
	}
}

// drop removes the keys that still route to sess.
func (t *table[K]) drop(sess *session, keys []K) {
	for _, k := range keys {
		if r := t.m[k]; r != nil && r.sess == sess {
			delete(t.m, k)
		}
	}
}
