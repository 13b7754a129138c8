package dial_test

import (
	"log"
	"log/slog"

	"github.com/iketcp/iketcp/relay/dial"
	"github.com/iketcp/iketcp/relay/streamlink"
)

// A client that reaches its server through an HTTP proxy, with TLS inside
// the tunnel, the server's key pinned.
func Example() {
	proxy, err := dial.ParseProxyURL("http://alice:s3cret@proxy.example:3128")
	if err != nil {
		log.Fatal(err)
	}
	tlsCfg, err := dial.TLSConfig(dial.TLSOptions{
		Pin: "sha256:c031c0669a611f09bd3cac2090c476f9d3c92d3643671c06762a708c530442ad",
	})
	if err != nil {
		log.Fatal(err)
	}
	d := streamlink.NewDialer(streamlink.Config{})
	d.Dial = dial.ViaHTTPProxy(proxy, dial.Direct(nil)) // transparent mode: dial.Direct(its bypass mark)
	d.TLS = tlsCfg
	_ = d // client.Config{Dialer: d}
}

// With --tls-insecure, the command says what the client gives up.
func ExampleInsecureWarning() {
	tlsCfg, err := dial.TLSConfig(dial.TLSOptions{Insecure: true})
	if err != nil {
		log.Fatal(err)
	}
	slog.Warn(dial.InsecureWarning)
	_ = tlsCfg
}
