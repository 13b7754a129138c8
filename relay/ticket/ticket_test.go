package ticket

import (
	"bytes"
	"testing"
)

func TestLinkKeyAgreesAndClaimsBindToTheLink(t *testing.T) {
	c, err := NewExchange()
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewExchange()
	if err != nil {
		t.Fatal(err)
	}
	kc, err := c.LinkKey(s.Public(), c.Public(), s.Public())
	if err != nil {
		t.Fatal(err)
	}
	ks, err := s.LinkKey(c.Public(), c.Public(), s.Public())
	if err != nil {
		t.Fatal(err)
	}
	if kc != ks || kc == (Key{}) {
		t.Fatal("the two ends derived different keys")
	}
	// A second link: new keys, so a claim made for it fails on the first.
	c2, _ := NewExchange()
	s2, _ := NewExchange()
	mac := ClaimMAC(kc, 7, c2.Public(), s2.Public())
	if !CheckClaim(ks, 7, c2.Public(), s2.Public(), mac[:]) {
		t.Fatal("a good claim was refused")
	}
	for name, ok := range map[string]bool{
		"other link":    CheckClaim(ks, 7, c.Public(), s.Public(), mac[:]),
		"other session": CheckClaim(ks, 8, c2.Public(), s2.Public(), mac[:]),
		"other key":     CheckClaim(Key{1}, 7, c2.Public(), s2.Public(), mac[:]),
		"short MAC":     CheckClaim(ks, 7, c2.Public(), s2.Public(), mac[:16]),
	} {
		if ok {
			t.Errorf("%s: claim accepted", name)
		}
	}
	if bytes.Equal(c.Public(), c2.Public()) {
		t.Fatal("key pairs repeat")
	}
}

func TestLinkKeyRefusesBadPublicKeys(t *testing.T) {
	e, _ := NewExchange()
	if _, err := e.LinkKey(make([]byte, 31), nil, nil); err == nil {
		t.Error("a short public key was taken")
	}
	if _, err := e.LinkKey(make([]byte, KeySize), nil, nil); err == nil {
		t.Error("the all-zero (low-order) public key was taken")
	}
}

func TestMoveMACBindsSPIAndLink(t *testing.T) {
	c, _ := NewExchange()
	s, _ := NewExchange()
	k := Key{9}
	mac := MoveMAC(k, 3, 0xc0000001, c.Public(), s.Public())
	if !CheckMove(k, 3, 0xc0000001, c.Public(), s.Public(), mac[:]) {
		t.Fatal("a good move was refused")
	}
	c2, _ := NewExchange()
	for name, ok := range map[string]bool{
		"other SPI":     CheckMove(k, 3, 0xc0000002, c.Public(), s.Public(), mac[:]),
		"other session": CheckMove(k, 4, 0xc0000001, c.Public(), s.Public(), mac[:]),
		"other link":    CheckMove(k, 3, 0xc0000001, c2.Public(), s.Public(), mac[:]),
		"a claim's MAC": CheckClaim(k, 3, c.Public(), s.Public(), mac[:]),
	} {
		if ok {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestJoinMACBindsEverythingItDeclares(t *testing.T) {
	c, _ := NewExchange()
	s, _ := NewExchange()
	k := Key{5}
	loc := [4]byte{1, 1, 1, 1}
	mac := JoinMAC(k, 3, loc, 2, 3, 1, c.Public(), s.Public())
	if !CheckJoin(k, 3, loc, 2, 3, 1, c.Public(), s.Public(), mac[:]) {
		t.Fatal("a good join was refused")
	}
	c2, _ := NewExchange()
	for name, ok := range map[string]bool{
		"other key":       CheckJoin(Key{6}, 3, loc, 2, 3, 1, c.Public(), s.Public(), mac[:]),
		"other session":   CheckJoin(k, 4, loc, 2, 3, 1, c.Public(), s.Public(), mac[:]),
		"other location":  CheckJoin(k, 3, [4]byte{1, 1, 1, 2}, 2, 3, 1, c.Public(), s.Public(), mac[:]),
		"other algorithm": CheckJoin(k, 3, loc, 1, 3, 1, c.Public(), s.Public(), mac[:]),
		"other weight":    CheckJoin(k, 3, loc, 2, 9, 1, c.Public(), s.Public(), mac[:]),
		"other member":    CheckJoin(k, 3, loc, 2, 3, 0, c.Public(), s.Public(), mac[:]),
		"other link":      CheckJoin(k, 3, loc, 2, 3, 1, c2.Public(), s.Public(), mac[:]),
		"a claim's MAC":   CheckClaim(k, 3, c.Public(), s.Public(), mac[:]),
	} {
		if ok {
			t.Errorf("%s: accepted", name)
		}
	}
}
