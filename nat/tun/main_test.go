package tun_test

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/iketcp/iketcp/nat/tun"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestCheckName(t *testing.T) {
	for name, ok := range map[string]bool{
		"iketcp0":                   true,
		"eth0.100":                  true,
		"a-name-too-long-for-linux": false,
		"tun%d":                     false,
		"a/b":                       false,
		"a:b":                       false,
		"a b":                       false,
		"..":                        false,
	} {
		if err := tun.CheckName(name); (err == nil) != ok {
			t.Errorf("CheckName(%q): %v", name, err)
		}
	}
}
