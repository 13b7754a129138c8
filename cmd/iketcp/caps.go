package main

import (
	"log/slog"
	"strings"
)

// capNeed is a capability a running instance keeps once it is set up,
// and why: everything else it was started with goes (dropCapabilities).
type capNeed struct {
	name string // as capabilities(7) spells it, lower case: "cap_net_admin"
	why  string
}

// needNetAdmin is the one capability a mode may keep, with its reason.
func needNetAdmin(why string) capNeed { return capNeed{name: "cap_net_admin", why: why} }

// dropCapabilities drops every capability but needs from the process, on
// every thread: what binding a low port, creating devices and installing
// rules took at start is not needed any more. An ordinary user with no
// capabilities has nothing to drop. It logs what it kept and why.
func dropCapabilities(log *slog.Logger, needs []capNeed) {
	kept, dropped, err := limitCapabilities(needs)
	if err != nil {
		log.Warn("capabilities not dropped", "err", err)
		return
	}
	if dropped == "" {
		return
	}
	if kept == "" {
		log.Info("capabilities dropped", "dropped", dropped, "kept", "none")
		return
	}
	var why []string
	for _, n := range needs {
		why = append(why, n.name+": "+n.why)
	}
	log.Info("capabilities dropped", "dropped", dropped, "kept", kept, "why", strings.Join(why, "; "))
}
