package lab

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// errNoOutput is returned by parsers that got nothing to parse.
var errNoOutput = errors.New("no output")

// IKESA is one IKE SA as reported by `swanctl --list-sas`.
type IKESA struct {
	Name         string // connection name
	State        string // e.g. ESTABLISHED, CONNECTING, REKEYING, DELETING
	UniqueID     string
	InitiatorSPI string // hex
	ResponderSPI string // hex
	LocalHost    string // "addr:port"
	RemoteHost   string // "addr:port"
	LocalID      string
	RemoteID     string
	Initiator    bool // this daemon initiated the IKE SA
	NATLocal     bool // this side is behind a NAT
	NATRemote    bool // the peer is behind a NAT
	// Encap is true when the SA uses UDP encapsulation (NAT detected or
	// faked, or a child SA with encap).
	Encap    bool
	Children []ChildSA
}

// ChildSA is one child SA of an IKE SA.
type ChildSA struct {
	Name       string // child config name
	UniqueID   string
	State      string // e.g. INSTALLED, REKEYED
	Mode       string // TUNNEL, TRANSPORT, BEET
	Protocol   string // ESP or AH
	Encap      bool   // ESP in UDP
	SPIIn      string // hex
	SPIOut     string // hex
	PacketsIn  uint64
	PacketsOut uint64
	BytesIn    uint64
	BytesOut   uint64
	LocalTS    []string
	RemoteTS   []string
}

// HasInstalledChild reports whether a child SA of sa is INSTALLED.
func (sa IKESA) HasInstalledChild() bool {
	for _, c := range sa.Children {
		if c.State == "INSTALLED" {
			return true
		}
	}
	return false
}

// viciSection is a parsed section of swanctl's --pretty output.
type viciSection struct {
	name     string
	values   map[string]string
	lists    map[string][]string
	sections []*viciSection
}

func newViciSection(name string) *viciSection {
	return &viciSection{name: name, values: map[string]string{}, lists: map[string][]string{}}
}

func (s *viciSection) section(name string) *viciSection {
	for _, sub := range s.sections {
		if sub.name == name {
			return sub
		}
	}
	return nil
}

// parseViciPretty parses the output of a swanctl command run with
// --pretty: a sequence of top-level sections ("list-sa event {...}") with
// "key = value" lines, nested "name {...}" sections and "key = [...]" lists.
func parseViciPretty(out []byte) ([]*viciSection, error) {
	root := newViciSection("")
	stack := []*viciSection{root}
	var listKey string
	inList := false
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	lineNo := 0
	for sc.Scan() {
		lineNo++
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		cur := stack[len(stack)-1]
		if inList {
			if line == "]" {
				inList = false
			} else {
				cur.lists[listKey] = append(cur.lists[listKey], line)
			}
			continue
		}
		switch {
		case line == "}":
			if len(stack) == 1 {
				return nil, fmt.Errorf("line %d: unbalanced }", lineNo)
			}
			stack = stack[:len(stack)-1]
		case strings.HasSuffix(line, " = ["):
			listKey = strings.TrimSuffix(line, " = [")
			cur.lists[listKey] = []string{}
			inList = true
		case strings.Contains(line, " = ") || strings.HasSuffix(line, " ="):
			key, value, _ := strings.Cut(line, " =")
			cur.values[key] = strings.TrimSpace(value)
		case strings.HasSuffix(line, "{"):
			sub := newViciSection(strings.TrimSpace(strings.TrimSuffix(line, "{")))
			cur.sections = append(cur.sections, sub)
			stack = append(stack, sub)
		default:
			return nil, fmt.Errorf("line %d: unexpected %q", lineNo, line)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(stack) != 1 || inList {
		return nil, fmt.Errorf("output ends inside a section (missing })")
	}
	return root.sections, nil
}

// ParseListSAs parses the output of `swanctl --list-sas --pretty`.
func ParseListSAs(out []byte) ([]IKESA, error) {
	top, err := parseViciPretty(out)
	if err != nil {
		return nil, fmt.Errorf("parse swanctl --list-sas output: %w", err)
	}
	if len(top) == 0 {
		return nil, fmt.Errorf("parse swanctl --list-sas output: %w", errNoOutput)
	}
	var sas []IKESA
	for _, ev := range top {
		if ev.name != "list-sa event" {
			continue // "list-sas reply" closes the listing
		}
		for _, s := range ev.sections {
			sas = append(sas, ikeSAFromSection(s))
		}
	}
	return sas, nil
}

func ikeSAFromSection(s *viciSection) IKESA {
	v := s.values
	sa := IKESA{
		Name:         s.name,
		State:        v["state"],
		UniqueID:     v["uniqueid"],
		InitiatorSPI: v["initiator-spi"],
		ResponderSPI: v["responder-spi"],
		LocalHost:    hostPort(v["local-host"], v["local-port"]),
		RemoteHost:   hostPort(v["remote-host"], v["remote-port"]),
		LocalID:      v["local-id"],
		RemoteID:     v["remote-id"],
		Initiator:    v["initiator"] == "yes",
		NATLocal:     v["nat-local"] == "yes",
		NATRemote:    v["nat-remote"] == "yes",
		Encap:        v["nat-any"] == "yes",
	}
	if children := s.section("child-sas"); children != nil {
		for _, c := range children.sections {
			cv := c.values
			name := cv["name"]
			if name == "" {
				name = c.name
			}
			child := ChildSA{
				Name:       name,
				UniqueID:   cv["uniqueid"],
				State:      cv["state"],
				Mode:       cv["mode"],
				Protocol:   cv["protocol"],
				Encap:      cv["encap"] == "yes",
				SPIIn:      cv["spi-in"],
				SPIOut:     cv["spi-out"],
				PacketsIn:  parseCount(cv["packets-in"]),
				PacketsOut: parseCount(cv["packets-out"]),
				BytesIn:    parseCount(cv["bytes-in"]),
				BytesOut:   parseCount(cv["bytes-out"]),
				LocalTS:    c.lists["local-ts"],
				RemoteTS:   c.lists["remote-ts"],
			}
			sa.Encap = sa.Encap || child.Encap
			sa.Children = append(sa.Children, child)
		}
	}
	return sa
}

func hostPort(host, port string) string {
	if host == "" {
		return ""
	}
	if port == "" {
		return host
	}
	return net.JoinHostPort(host, port)
}

func parseCount(s string) uint64 {
	n, _ := strconv.ParseUint(s, 10, 64)
	return n
}
