package main

// The configuration file. Every flag of a command is a key of its file,
// found from the command's own flag set: a flag added to the command is a
// key with no code here. Precedence, highest first: the command line, the
// environment (IKETCP_*), the file (a tunnel's own keys, then the file's
// top level), the flag's default.

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/urfave/cli/v2"
	"go.yaml.in/yaml/v3"

	"github.com/iketcp/iketcp/relay/control"
)

// Keys of a file that are not flags.
const (
	keyRole    = "role"    // server or client: what check-config checks the file as
	keyTunnels = "tunnels" // client: one client instance per entry
	keyName    = "name"    // a tunnel's name
)

// processWide are the flags that belong to the process, not to one of its
// tunnels: they may appear only at a file's top level.
var processWide = []string{"config", "metrics", "log-level", "log-format", "shutdown-timeout"}

// source says where an effective value came from.
type source struct {
	kind string // "flag", "env", "file", "default"
	env  string // kind env: the variable
	file string // kind file: the file and line, file:line
}

func (s source) String() string {
	switch s.kind {
	case "env":
		return "environment " + s.env
	case "file":
		return s.file
	}
	return s.kind
}

// fileEntry is one key of a file with its value.
type fileEntry struct {
	key, val *yaml.Node
}

// configFile is a parsed configuration file.
type configFile struct {
	path    string
	role    string
	top     map[string]fileEntry
	tunnels []tunnelEntry
}

type tunnelEntry struct {
	name string
	line int
	keys map[string]fileEntry
}

// configError is a configuration that cannot be used: bad flags, bad
// environment or a bad file. Nothing was started; the exit code is 2.
type configError struct{ err error }

func (e *configError) Error() string { return e.err.Error() }
func (e *configError) Unwrap() error { return e.err }

func configErrorf(format string, a ...any) error {
	return &configError{fmt.Errorf(format, a...)}
}

func (f *configFile) at(n *yaml.Node) string { return fmt.Sprintf("%s:%d", f.path, n.Line) }

// flagNames lists every name (aliases included) of cmd's flags.
func flagNames(flags []cli.Flag) map[string]cli.Flag {
	m := map[string]cli.Flag{}
	for _, f := range flags {
		for _, n := range f.Names() {
			m[n] = f
		}
	}
	return m
}

// readConfigFile parses path as the file of command cmd ("server" or
// "client"; "" for check-config, which takes the file's role), checking
// every key against the command's flags.
func readConfigFile(path, cmd string, flagsOf func(role string) []cli.Flag) (*configFile, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, configErrorf("--config: %w", err)
	}
	f := &configFile{path: path, top: map[string]fileEntry{}}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return f.checkRole(cmd) // an empty file sets nothing
		}
		return nil, configErrorf("%s: %v", path, strings.TrimPrefix(err.Error(), "yaml: "))
	}
	root := &doc
	if root.Kind == yaml.DocumentNode && len(root.Content) == 1 {
		root = root.Content[0]
	}
	if root.Kind != yaml.MappingNode {
		return nil, configErrorf("%s: the file must be a mapping of flag names to values, e.g. \"max-conns: 4096\"", f.at(root))
	}
	// The role first: it says which command's flags are keys.
	for i := 0; i < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		if k.Value == keyRole {
			if v.Kind != yaml.ScalarNode || (v.Value != "server" && v.Value != "client") {
				return nil, configErrorf("%s: key %q: want server or client", f.at(v), keyRole)
			}
			f.role = v.Value
		}
	}
	if _, err := f.checkRole(cmd); err != nil {
		return nil, err
	}
	flags := flagNames(flagsOf(f.role))
	for i := 0; i < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		switch {
		case k.Value == keyRole:
			continue
		case k.Value == keyTunnels && f.role == "client":
			if err := f.readTunnels(v, flags); err != nil {
				return nil, err
			}
			continue
		}
		if err := f.checkKey(k, v, flags, f.top); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// checkRole settles the file's role against the command that reads it.
func (f *configFile) checkRole(cmd string) (*configFile, error) {
	switch {
	case cmd == "" && f.role == "":
		return nil, configErrorf("%s: say what the file configures with \"role: server\" or \"role: client\"", f.path)
	case cmd != "" && f.role != "" && f.role != cmd:
		return nil, configErrorf("%s: the file is for iketcp %s (role: %s), not iketcp %s", f.path, f.role, f.role, cmd)
	case f.role == "":
		f.role = cmd
	}
	return f, nil
}

// checkKey checks that k names a flag and that v has a value's shape,
// and records it in into.
func (f *configFile) checkKey(k, v *yaml.Node, flags map[string]cli.Flag, into map[string]fileEntry) error {
	fl, ok := flags[k.Value]
	if !ok || k.Value == "config" {
		if k.Value == "config" {
			return configErrorf("%s: key %q: a file cannot name another", f.at(k), k.Value)
		}
		return configErrorf("%s: unknown key %q: not a flag of iketcp %s (iketcp %s --help lists them)", f.at(k), k.Value, f.role, f.role)
	}
	name := fl.Names()[0]
	if prev, dup := into[name]; dup {
		return configErrorf("%s: key %q given twice (first at line %d)", f.at(k), k.Value, prev.key.Line)
	}
	if name == "member" && v.Kind == yaml.SequenceNode {
		var err error
		if v, err = f.memberMappings(k, v, flags, into); err != nil {
			return err
		}
	}
	switch v.Kind {
	case yaml.ScalarNode:
		if v.Tag == "!!null" {
			return configErrorf("%s: key %q has no value", f.at(k), k.Value)
		}
	case yaml.SequenceNode:
		if !isSlice(fl) {
			return configErrorf("%s: key %q takes one value, not a list", f.at(v), k.Value)
		}
		for _, e := range v.Content {
			if e.Kind != yaml.ScalarNode || e.Tag == "!!null" {
				return configErrorf("%s: key %q: each item must be a plain value", f.at(e), k.Value)
			}
		}
	default:
		return configErrorf("%s: key %q: want a value, not a mapping", f.at(v), k.Value)
	}
	into[name] = fileEntry{k, v}
	return nil
}

// memberKeys are the keys of a member in the file's mapping form.
var memberKeys = []string{"name", "local", "hub", "weight"}

// memberMappings turns the mapping form of the member key,
//
//	member:
//	  - name: wan1
//	    local: 100.64.0.2
//	    hub: 203.0.113.2:4500
//	    weight: 3
//
// into the flag's NAME=LOCAL_ADDR->HUB:PORT values, and the weights into
// the weight key, as if given there; items already in the flag's form
// stay as they are.
func (f *configFile) memberMappings(k, v *yaml.Node, flags map[string]cli.Flag, into map[string]fileEntry) (*yaml.Node, error) {
	out := &yaml.Node{Kind: yaml.SequenceNode, Line: v.Line, Column: v.Column}
	weights := &yaml.Node{Kind: yaml.SequenceNode, Line: v.Line, Column: v.Column}
	var weightKey *yaml.Node
	for _, item := range v.Content {
		if item.Kind != yaml.MappingNode {
			out.Content = append(out.Content, item)
			continue
		}
		got := map[string]*yaml.Node{}
		for j := 0; j < len(item.Content); j += 2 {
			mk, mv := item.Content[j], item.Content[j+1]
			if !slices.Contains(memberKeys, mk.Value) {
				return nil, configErrorf("%s: member: unknown key %q: want %s", f.at(mk), mk.Value, strings.Join(memberKeys, ", "))
			}
			if mv.Kind != yaml.ScalarNode || mv.Tag == "!!null" || mv.Value == "" {
				return nil, configErrorf("%s: member: key %q wants a plain value", f.at(mv), mk.Value)
			}
			got[mk.Value] = mv
			if mk.Value == "weight" && weightKey == nil {
				weightKey = mk
			}
		}
		for _, key := range memberKeys[:3] {
			if got[key] == nil {
				return nil, configErrorf("%s: member: missing %q (a member has a name, the local address it leaves by, and the hub's host:port)", f.at(item), key)
			}
		}
		name := got["name"].Value
		out.Content = append(out.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Line: item.Line, Column: item.Column,
			Value: name + "=" + got["local"].Value + "->" + got["hub"].Value})
		if w := got["weight"]; w != nil {
			weights.Content = append(weights.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Line: w.Line, Column: w.Column,
				Value: name + "=" + w.Value})
		}
	}
	if weightKey != nil {
		wk := *weightKey
		wk.Value = "weight"
		if err := f.checkKey(&wk, weights, flags, into); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func (f *configFile) readTunnels(v *yaml.Node, flags map[string]cli.Flag) error {
	if v.Kind != yaml.SequenceNode || len(v.Content) == 0 {
		return configErrorf("%s: key %q: want a list of tunnels, each a mapping of client flags", f.at(v), keyTunnels)
	}
	for i, t := range v.Content {
		if t.Kind != yaml.MappingNode {
			return configErrorf("%s: tunnel %d: want a mapping of client flags", f.at(t), i+1)
		}
		te := tunnelEntry{name: fmt.Sprintf("tunnel-%d", i+1), line: t.Line, keys: map[string]fileEntry{}}
		for j := 0; j < len(t.Content); j += 2 {
			k, val := t.Content[j], t.Content[j+1]
			if k.Value == keyName {
				if val.Kind != yaml.ScalarNode || !validName.MatchString(val.Value) {
					return configErrorf("%s: tunnel name %q: want letters, digits, '-', '_' or '.'", f.at(val), val.Value)
				}
				te.name = val.Value
				continue
			}
			if slices.Contains(processWide, k.Value) {
				return configErrorf("%s: key %q belongs to the whole process: put it at the file's top level", f.at(k), k.Value)
			}
			if err := f.checkKey(k, val, flags, te.keys); err != nil {
				return err
			}
		}
		for _, other := range f.tunnels {
			if other.name == te.name {
				return configErrorf("%s: tunnel name %q is taken by the tunnel at line %d", f.at(t), te.name, other.line)
			}
		}
		f.tunnels = append(f.tunnels, te)
	}
	return nil
}

var validName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func isSlice(f cli.Flag) bool {
	switch f.(type) {
	case *cli.StringSliceFlag, *cli.IntSliceFlag, *cli.Int64SliceFlag, *cli.Float64SliceFlag, *cli.UintSliceFlag, *cli.Uint64SliceFlag:
		return true
	}
	return false
}

func values(v *yaml.Node) []string {
	if v.Kind == yaml.SequenceNode {
		var out []string
		for _, e := range v.Content {
			out = append(out, e.Value)
		}
		return out
	}
	return []string{v.Value}
}

// recorder is a flag.Value that records what the command line gave.
type recorder struct {
	vals   *[]string
	isBool bool
}

func (r recorder) String() string     { return "" }
func (r recorder) IsBoolFlag() bool   { return r.isBool }
func (r recorder) Set(v string) error { *r.vals = append(*r.vals, v); return nil }

// commandLine returns what args (a command's arguments, its name not
// included) give each of flags, by the flag's first name.
func commandLine(flags []cli.Flag, args []string) map[string][]string {
	set := flag.NewFlagSet("", flag.ContinueOnError)
	set.SetOutput(new(bytes.Buffer))
	recorded := map[string]*[]string{}
	for _, f := range flags {
		vals := new([]string)
		_, isBool := f.(*cli.BoolFlag)
		for _, n := range f.Names() {
			set.Var(recorder{vals, isBool}, n, "")
		}
		recorded[f.Names()[0]] = vals
	}
	set.Parse(args) // urfave has parsed them already; errors were its
	got := map[string][]string{}
	for name, vals := range recorded {
		if len(*vals) > 0 {
			got[name] = *vals
		}
	}
	return got
}

// instance is one relay the process runs: the server, or one client
// tunnel. Its context holds the effective value of every flag.
type instance struct {
	name    string // the tunnel's name; "" for a lone instance
	ctx     *cli.Context
	sources map[string]source
	file    *configFile
}

// cmdArgs returns the arguments c's command was given, its name not
// included.
func cmdArgs(c *cli.Context) []string {
	if a, ok := c.App.Metadata["args"].([]string); ok {
		if i := slices.Index(a, c.Command.Name); i >= 0 {
			return a[i+1:]
		}
	}
	return nil
}

// instances returns what c's command runs: one instance, or with a
// client file that lists tunnels, one per tunnel, each with the effective
// value of every flag.
func instances(c *cli.Context) ([]*instance, error) {
	var file *configFile
	if path := c.String("config"); path != "" {
		var err error
		if file, err = readConfigFile(path, c.Command.Name, roleFlags); err != nil {
			return nil, err
		}
	}
	return buildInstances(c, c.Command, cmdArgs(c), file)
}

// buildInstances layers args, the environment and file over cmd's
// defaults.
func buildInstances(parent *cli.Context, cmd *cli.Command, args []string, file *configFile) ([]*instance, error) {
	cl := commandLine(cmd.Flags, args)
	var tunnels []tunnelEntry
	if file != nil {
		tunnels = file.tunnels
	}
	if len(tunnels) == 0 {
		tunnels = []tunnelEntry{{}}
	}
	var out []*instance
	for _, t := range tunnels {
		in, err := buildInstance(parent, cmd, cl, file, t, len(tunnels) > 1)
		if err != nil {
			return nil, err
		}
		out = append(out, in)
	}
	if len(out) > 1 {
		var explicit, tun, fake []*instance
		for _, in := range out {
			if in.ctx.Bool("tun") {
				tun = append(tun, in)
			} else {
				explicit = append(explicit, in)
			}
			if in.ctx.String("encap") == encapFakeTCP {
				fake = append(fake, in)
			}
		}
		for _, check := range []struct {
			ins   []*instance
			names []string
		}{
			{out, []string{"control"}},
			{explicit, []string{"listen"}},
			{tun, []string{"tun-name", "tun-table", "tun-mark"}},
			{fake, []string{"fake-tcp-name", "fake-tcp-net"}},
		} {
			for _, name := range check.names {
				if err := distinct(check.ins, name); err != nil {
					return nil, err
				}
			}
		}
	}
	return out, nil
}

// distinct checks that no two instances share the value of flag name.
func distinct(ins []*instance, name string) error {
	seen := map[string]*instance{}
	for _, in := range ins {
		v := fmt.Sprint(in.ctx.Value(name))
		if v == "" {
			v = "(the default)"
		}
		if o, ok := seen[v]; ok {
			return configErrorf("tunnels %q and %q both have %s %s: give each its own", o.name, in.name, name, v)
		}
		seen[v] = in
	}
	return nil
}

func buildInstance(parent *cli.Context, cmd *cli.Command, cl map[string][]string, file *configFile, t tunnelEntry, several bool) (*instance, error) {
	set := flag.NewFlagSet(cmd.Name, flag.ContinueOnError)
	set.SetOutput(new(bytes.Buffer))
	for _, f := range cmd.Flags {
		if err := f.Apply(set); err != nil {
			return nil, configErrorf("%v", err)
		}
	}
	in := &instance{name: t.name, sources: map[string]source{}, file: file}
	for _, f := range cmd.Flags {
		name := f.Names()[0]
		env := envOf(f)
		switch {
		case cl[name] != nil:
			in.sources[name] = source{kind: "flag"}
			for _, v := range cl[name] {
				if err := set.Set(name, v); err != nil {
					return nil, configErrorf("--%s %q: %v", name, v, err)
				}
			}
		case env != "":
			in.sources[name] = source{kind: "env", env: env} // Apply took it
		default:
			e, ok := t.keys[name]
			if !ok && file != nil {
				e, ok = file.top[name]
			}
			if !ok {
				if name == "control" && several {
					// Each tunnel has a socket of its own.
					set.Set(name, filepath.Join(control.DefaultDir(), "client-"+t.name+".sock"))
				}
				in.sources[name] = source{kind: "default"}
				continue
			}
			in.sources[name] = source{kind: "file", file: file.at(e.key)}
			for _, v := range values(e.val) {
				if err := set.Set(name, v); err != nil {
					return nil, configErrorf("%s: key %q: %q is not %s", file.at(e.val), e.key.Value, v, want(f))
				}
			}
		}
	}
	ctx := cli.NewContext(parent.App, set, parent)
	ctx.Command = cmd
	in.ctx = ctx
	return in, nil
}

// envOf returns the variable of f that is set in the environment, or "".
func envOf(f cli.Flag) string {
	if ev, ok := f.(interface{ GetEnvVars() []string }); ok {
		for _, e := range ev.GetEnvVars() {
			if v, ok := os.LookupEnv(e); ok && v != "" {
				return e
			}
		}
	}
	return ""
}

// want says what kind of value f takes.
func want(f cli.Flag) string {
	switch f.(type) {
	case *cli.IntFlag, *cli.Int64Flag, *cli.IntSliceFlag:
		return "an integer"
	case *cli.UintFlag, *cli.Uint64Flag:
		return "a non-negative integer"
	case *cli.DurationFlag:
		return "a duration such as 500ms, 5s or 2m"
	case *cli.BoolFlag:
		return "true or false"
	case *cli.Float64Flag:
		return "a number"
	}
	return "a valid value"
}

var flagInError = regexp.MustCompile(`--([a-z0-9][a-z0-9-]*)`)

// located adds, to an error about a flag whose value came from the file,
// where in the file: "client.yaml:7: key "max-flows": --max-flows 0: must be positive".
func (in *instance) located(err error) error {
	if err == nil {
		return nil
	}
	m := flagInError.FindStringSubmatch(err.Error())
	prefix := ""
	if in.name != "" && len(in.file.tunnels) > 1 {
		prefix = "tunnel " + in.name + ": "
	}
	if m != nil {
		if s, ok := in.sources[m[1]]; ok && s.kind == "file" {
			return &configError{fmt.Errorf("%s%s: key %q: %w", prefix, s.file, m[1], err)}
		}
	}
	if prefix != "" {
		return fmt.Errorf("%s%w", prefix, err)
	}
	return err
}

// writeEffective prints every flag of in with its value and where the
// value came from, as YAML that a file could hold.
func (in *instance) writeEffective(b *strings.Builder, indent string) {
	for _, f := range in.ctx.Command.Flags {
		name := f.Names()[0]
		if name == "config" {
			continue
		}
		v := in.ctx.Value(name)
		var val string
		switch x := v.(type) {
		case cli.StringSlice:
			val = yamlList(x.Value())
		case []string:
			val = yamlList(x)
		case string:
			val = yamlScalar(x)
		default: // numbers, booleans, durations: as a file writes them
			val = fmt.Sprint(x)
		}
		fmt.Fprintf(b, "%s%s: %s  # %s\n", indent, name, val, in.sources[name])
	}
}

func yamlList(vs []string) string {
	q := make([]string, len(vs))
	for i, v := range vs {
		q[i] = yamlScalar(v)
	}
	return "[" + strings.Join(q, ", ") + "]"
}

func yamlScalar(s string) string {
	out, err := yaml.Marshal(s)
	if err != nil {
		return fmt.Sprintf("%q", s)
	}
	return strings.TrimSuffix(string(out), "\n")
}
