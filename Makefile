# iketcp: carry IKEv2 and ESP over TCP (RFC 9329).
#
#   make demo    a real strongSwan tunnel through a UDP-blocking carrier
#                (make demo-transparent: the same with the daemon unchanged;
#                 make demo-fake-tcp: fake-TCP through a strict middlebox)
#   make test    everything CI checks: lint, unit, race, fuzz, integration,
#                interoperability
#   make interop the interoperability tests alone: libreswan with the Linux
#                kernel's espintcp in a User-Mode Linux guest, and kernel ESP
#                through transparent mode on 6.1 and 6.12 guests
#                (make interop-deps builds their kernels once, then caches them)
#   make bench   benchmarks, with each one's ratio to its baseline, then
#                iketcp as whole processes against direct UDP and udptunnel
#                (iketcp-lab bench: docs/bench.md and docs/bench.png)
#
# demo and test install what they need (Debian packages, staticcheck) and
# need root for the network namespaces.

GO          ?= go
BIN         := bin
VERSION     := $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -X main.version=$(VERSION)
STATICCHECK_VERSION := v0.8.2
STATICCHECK := $(shell $(GO) env GOPATH)/bin/staticcheck
# govulncheck, and the vulnerability database it reads: built from the
# golang.org/x/vulndb module (its OSV files, indexed by its indexdb), both
# through the Go module proxy, since vuln.go.dev is out of reach here.
# Bump VULNDB_VERSION to take newer reports.
GOVULNCHECK_VERSION := v1.9.0
VULNDB_VERSION      := v0.0.0-20261105234957-e22db6528018
GOVULNCHECK := $(shell $(GO) env GOPATH)/bin/govulncheck
INDEXDB     := $(shell $(GO) env GOPATH)/bin/indexdb
VULNDB      := $(BIN)/vulndb-$(VULNDB_VERSION)
# An execution count, not a duration: Go 1.26's fuzz coordinator can fail
# a target with "context deadline exceeded" when a duration runs out while
# a worker is mid-call (go.dev/issue/75804, fixed in Go 1.27); a count has
# no deadline to race.
FUZZTIME    ?= 100000x
BENCHCOUNT  ?= 5

# BENCH_RATIOS reads `go test -bench` output and prints, for each benchmark
# with sub-benchmarks, every variant's median over its baseline's: MB/s
# (higher is better) where reported, else rtt-p50-ms (lower is better).
# Baselines are the variants named baseline-copy, append-copy, single or
# udp-direct.
define BENCH_RATIOS
/^Benchmark/ {
	name = $$1; sub(/-[0-9]+$$/, "", name)
	v = ""; unit = ""
	for (i = 2; i <= NF; i++) {
		if ($$i == "MB/s") { v = $$(i-1); unit = "MB/s" }
		if ($$i == "rtt-p50-ms" && unit == "") { v = $$(i-1); unit = "ms p50 RTT" }
	}
	if (unit == "") next
	n[name]++; vals[name, n[name]] = v; units[name] = unit
}
function median(name,    k, j, t, m, a) {
	m = n[name]
	for (k = 1; k <= m; k++) a[k] = vals[name, k]
	for (k = 1; k <= m; k++) for (j = k + 1; j <= m; j++) if (a[j] < a[k]) { t = a[k]; a[k] = a[j]; a[j] = t }
	return a[int((m + 1) / 2)]
}
END {
	print "\nratios to the baseline measured in the same run (medians):"
	for (name in n) {
		split(name, p, "/")
		if (p[2] ~ /^(baseline-copy|append-copy|single|udp-direct)$$/) base[p[1]] = name
	}
	for (name in n) {
		split(name, p, "/")
		if (!(p[1] in base) || base[p[1]] == name) continue
		b = base[p[1]]
		printf "  %-36s %10.6g %s  vs %-34s %10.6g  ratio %.3g\n", name, median(name), units[name], b, median(b), median(name) / median(b)
	}
}
endef
export BENCH_RATIOS

.PHONY: image-context image all build deps interop-deps interop lint vulncheck test unit alloc fuzz bench demo demo-transparent demo-fake-tcp lab-up lab-test lab-down clean

all: build

# iketcp is built without cgo: only then can it drop its capabilities on
# every thread once it is set up (syscall.AllThreadsSyscall).
build:
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/iketcp ./cmd/iketcp
	$(GO) build -o $(BIN)/iketcp-lab ./cmd/iketcp-lab

# The lab's packages (strongSwan, nftables, tcpdump, iproute2, the front
# door's third parties: haproxy, nginx, tinyproxy, curl; udptunnel and
# gnuplot for make bench), installed only when a tool is missing, with no
# service started on the host.
deps: build
	$(BIN)/iketcp-lab deps

# The interoperability lab (integration/uml): the packages that build a
# User-Mode Linux kernel and run Debian's libreswan (unpacked, never
# installed), and the kernels themselves from Debian's linux-source-6.1 and
# linux-source-6.12 with integration/uml/kernel.config, built once into
# /var/cache/iketcp-lab/uml (about 5 minutes each on 2 idle cores) and
# reused while the source version, the config and the patch stay the same.
interop-deps: build
	$(BIN)/iketcp-lab interop-deps

# The interoperability tests alone; make test runs them with the rest.
interop: deps interop-deps
	$(GO) test -race -count=1 -timeout 20m -run '^TestInterop' -v ./integration

$(STATICCHECK):
	$(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

$(GOVULNCHECK):
	$(GO) install golang.org/x/vuln/cmd/govulncheck@$(GOVULNCHECK_VERSION)

$(INDEXDB):
	$(GO) install golang.org/x/vulndb/cmd/indexdb@$(VULNDB_VERSION)

$(VULNDB): | $(INDEXDB)
	@dir=$$(cd / && $(GO) mod download -json golang.org/x/vulndb@$(VULNDB_VERSION) | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p'); \
	if [ ! -d "$$dir/data/osv" ]; then echo "golang.org/x/vulndb@$(VULNDB_VERSION) has no data/osv"; exit 1; fi; \
	rm -rf $@.tmp && $(INDEXDB) -vulns "$$dir/data/osv" -out $@.tmp && mv $@.tmp $@

# Fails on a called vulnerability in a module go.mod requires; lists the
# standard library's that only a newer Go than the toolchain fixes.
vulncheck: $(GOVULNCHECK) $(VULNDB)
	$(GO) run ./cmd/iketcp-lab vulncheck --govulncheck $(GOVULNCHECK) --db $(VULNDB) ./...

lint: $(STATICCHECK) vulncheck
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(STATICCHECK) ./...

# Every test, integration and interoperability included, under the race
# detector.
unit:
	$(GO) test -race -count=1 -timeout 25m ./...

# Allocation and memory checks need a build without the race detector.
alloc:
	$(GO) test -count=1 -run 'Allocate|IdleMemory' ./...

# Each fuzz target of each package that has some, for a short while;
# findings land in that package's testdata/fuzz.
FUZZ_PACKAGES := ./framing ./nat/packet ./nat/faketcp ./relay/dial ./relay/frontdoor
fuzz:
	@for pkg in $(FUZZ_PACKAGES); do \
		for target in $$($(GO) test -list 'Fuzz.*' $$pkg | grep ^Fuzz); do \
			echo "fuzz $$pkg $$target ($(FUZZTIME))"; \
			$(GO) test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done

test: deps interop-deps lint unit alloc fuzz
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 1x ./... > /dev/null
	@echo "make test: all passed"

# Benchmarks, then each variant's throughput as a ratio to the baseline
# measured in the same run (median over BENCHCOUNT runs); then the harness
# measures bin/iketcp as whole processes in network namespaces (direct UDP,
# RFC 9329, fake-TCP, udptunnel; latency under load; the scale ladder) and
# writes docs/bench.md, docs/bench.png and docs/bench.json. About 12
# minutes in all on 2 cores.
bench: deps
	$(GO) test -p 1 -run '^$$' -bench . -benchmem -count $(BENCHCOUNT) ./framing ./nat/packet ./nat/faketcp ./relay/... ./integration | tee $(BIN)/bench.txt
	@awk "$$BENCH_RATIOS" $(BIN)/bench.txt
	$(BIN)/iketcp-lab bench --iketcp $(BIN)/iketcp --out docs

demo: deps build
	$(BIN)/iketcp-lab demo --iketcp $(BIN)/iketcp

# The same through transparent mode: the site's strongSwan unchanged.
demo-transparent: deps build
	$(BIN)/iketcp-lab demo --transparent --iketcp $(BIN)/iketcp

# The same in fake-TCP mode, through a strict anti-replay middlebox.
demo-fake-tcp: deps build
	$(BIN)/iketcp-lab demo --fake-tcp --iketcp $(BIN)/iketcp

# The container image (Dockerfile): a static binary in an empty image.
# podman builds it from a binary built here (the Dockerfile's context
# stage), so nothing but the build context is needed; docker build . builds
# from source in the golang image instead.
IMAGE ?= localhost/iketcp:$(VERSION)
image-context:
	rm -rf $(BIN)/image && mkdir -p $(BIN)/image/run/iketcp && chmod 1777 $(BIN)/image/run/iketcp
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '-s -w $(LDFLAGS)' -o $(BIN)/image/iketcp ./cmd/iketcp

image: image-context
	podman build --build-arg BINARY_FROM=context --build-arg VERSION=$(VERSION) -t $(IMAGE) .

# A lab that stays up to rehearse against: make lab-up PROFILE=cgnat
# (open, block-udp, cgnat, strict-tcp, slow), then make lab-test, make lab-down.
PROFILE ?= block-udp
lab-up: deps build
	$(BIN)/iketcp-lab up --profile $(PROFILE) --iketcp $(CURDIR)/$(BIN)/iketcp

lab-test:
	$(BIN)/iketcp-lab test

lab-down:
	$(BIN)/iketcp-lab down

clean:
	rm -rf $(BIN)
