package server

// maxRouteKeys bounds the SPIs of each kind that route to one session;
// past it the oldest stops routing. Rekeying adds SPIs for as long as a
// session lives, so without a bound a long-lived session would grow the
// table forever.
const maxRouteKeys = 64

// routes finds sessions by the SPIs their frames carry: IKE SAs by the
// initiator's SPI, ESP by the SPI of ESP that arrives from clients.
// Guarded by Server.mu.
type routes struct {
	ike table[uint64]
	esp table[uint32]
}

func newRoutes() routes {
	return routes{ike: table[uint64]{m: make(map[uint64]*session)}, esp: table[uint32]{m: make(map[uint32]*session)}}
}

// drop removes every route to sess.
func (r *routes) drop(sess *session) {
	r.ike.drop(sess, sess.ikeKeys)
	r.esp.drop(sess, sess.espKeys)
}

// table maps SPIs of one kind to sessions. Each session records its keys
// of the kind, oldest first, in a slice of its own (keys).
type table[K comparable] struct {
	m map[K]*session
}

// add makes key route to sess, recording it in sess's keys and retiring
// the session's oldest key past maxRouteKeys.
func (t *table[K]) add(sess *session, keys *[]K, key K) {
	t.m[key] = sess
	*keys = append(*keys, key)
	if len(*keys) > maxRouteKeys {
		if old := (*keys)[0]; t.m[old] == sess {
			delete(t.m, old)
		}
		*keys = append((*keys)[:0], (*keys)[1:]...)
	}
}

// drop removes the keys that still route to sess.
func (t *table[K]) drop(sess *session, keys []K) {
	for _, k := range keys {
		if t.m[k] == sess {
			delete(t.m, k)
		}
	}
}

// lookupOrJoin returns the session key routes to; for an unknown key, the
// connection's current session (if it has one that is open), which key
// then joins: a new SA of the daemon that connection carries.
func (t *table[K]) lookupOrJoin(key K, current *session, keys func(*session) *[]K) *session {
	if sess := t.m[key]; sess != nil {
		return sess
	}
	if current == nil || current.closed.Load() {
		return nil
	}
	t.add(current, keys(current), key)
	return current
}

func ikeKeys(sess *session) *[]uint64 { return &sess.ikeKeys }
func espKeys(sess *session) *[]uint32 { return &sess.espKeys }
