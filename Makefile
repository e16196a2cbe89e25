# colo: `make demo` runs a container in a VM through a private containerd;
# `make test` runs every test. Both set up a fresh machine first.
SHELL := /bin/bash
GO ?= go
BUILD := $(CURDIR)/build
BIN := $(BUILD)/bin
TOOLS := $(BUILD)/tools
GUEST := $(BUILD)/guest
# The guest kernel package, downloaded once per machine.
GUEST_CACHE ?= /var/cache/colo
# Where the default config (config.Default) expects the guest image.
GUEST_INSTALL ?= /usr/share/colo
VERSION := $(shell git describe --always --dirty 2>/dev/null || echo dev)
GO_SRC := $(shell find . -name '*.go' -not -path './build/*') go.mod go.sum
export PATH := $(BIN):$(TOOLS):$(PATH)
export GOFLAGS := -buildvcs=false

.PHONY: all setup build guest generate check-generated lint test unit e2e demo bench bench-colo clean \
	install uninstall dist

all: build guest

# setup installs Debian packages and Go tools; its stamp is redone when the
# script changes.
setup: $(TOOLS)/.setup
$(TOOLS)/.setup: scripts/setup.sh
	TOOLS=$(TOOLS) scripts/setup.sh
	touch $@

build: $(BIN)/containerd-shim-colo-v2 $(BIN)/colo-agent $(BIN)/colo

$(BIN)/containerd-shim-colo-v2: $(GO_SRC) | setup
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $@ ./cmd/containerd-shim-colo-v2

$(BIN)/colo: $(GO_SRC) | setup
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $@ ./cmd/colo

# The agent is the guest's /init: static, with cgo for runc's nsenter and
# libseccomp (linked statically) for specs with linux.seccomp.
$(BIN)/colo-agent: $(GO_SRC) | setup
	CGO_ENABLED=1 $(GO) build -tags seccomp,osusergo,netgo \
		-ldflags "-s -w -extldflags -static -X main.version=$(VERSION)" \
		-o $@ ./cmd/colo-agent

guest: $(GUEST_INSTALL)/vmlinux $(GUEST_INSTALL)/initrd.img

$(GUEST)/vmlinux $(GUEST)/initrd.img &: $(BIN)/colo-agent guest/build.sh guest/modules | setup
	guest/build.sh --agent $(BIN)/colo-agent --out $(GUEST) --cache $(GUEST_CACHE)

$(GUEST_INSTALL)/%: $(GUEST)/%
	install -D -m 0644 $< $@

generate: setup
	cd agentproto && protoc -I . -I /usr/include \
		--go_out=paths=source_relative:. --go-ttrpc_out=paths=source_relative:. agent.proto

# Fails when the committed generated code differs from what the .proto and
# the pinned generators produce.
check-generated: setup
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	cp agentproto/agent.proto $$tmp/ && \
	(cd $$tmp && protoc -I . -I /usr/include \
		--go_out=paths=source_relative:. --go-ttrpc_out=paths=source_relative:. agent.proto) && \
	for f in agent.pb.go agent_ttrpc.pb.go; do \
		diff -u agentproto/$$f $$tmp/$$f || { echo "agentproto/$$f is stale: run make generate"; exit 1; }; \
	done

lint:
	@bad=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$bad" ]; then echo "gofmt needed:"; echo "$$bad"; exit 1; fi
	$(GO) vet ./...

unit: setup
	$(GO) test -count=1 -timeout 20m $$($(GO) list ./... | grep -v /e2e)

# End-to-end tests: real containerd, QEMU, guest and agent.
e2e: build guest
	COLO_E2E=1 $(GO) test -count=1 -timeout 40m -v ./e2e/...

test: check-generated lint build guest
	COLO_E2E=1 COLO_TEST_GUEST=$(GUEST_INSTALL) $(GO) test -count=1 -timeout 40m ./...

demo: build guest
	$(GO) run ./testbed/demo

# Measures colo beside runc; writes docs/benchmarks.{md,json,png}.
BENCH_FLAGS ?= -n 7 -pods 10
bench: build guest
	$(GO) run ./bench $(BENCH_FLAGS)

# An online HTTP service's latency (open loop) beside an offline batch load
# in runc and colo; writes docs/colocation.{json,png} and the results in
# docs/colocation.md.
bench-colo: build guest
	$(GO) build -o $(BUILD)/bench ./bench
	$(BUILD)/bench -colocation

# make install copies what make build guest left in build/ (it builds
# nothing) under $(DESTDIR): the shim and the CLI to $(PREFIX)/bin, the guest
# image and containerd's runtime snippet to $(GUEST_INSTALL), the default
# config to /etc/colo/config.toml unless one is there. deploy/install.sh lists
# what it installed in $(INSTALL_MANIFEST); make uninstall removes that, the
# config only while it is the default. make dist: the same tree in a tarball
# with deploy/install.sh and the Kubernetes manifests. docs/install.md.
PREFIX ?= /usr/local
DIST ?= $(BUILD)/dist
DIST_NAME = colo-$(VERSION)-linux-amd64
INSTALL_MANIFEST = $(GUEST_INSTALL)/installed-files
INSTALL_FROM = $(BIN)/containerd-shim-colo-v2 $(BIN)/colo $(GUEST)/vmlinux $(GUEST)/initrd.img
# The tarball's files' mtime: the last commit's.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
# The installed tree, written under $(1).
stage = install -D -m 0755 -t $(1)$(PREFIX)/bin $(BIN)/containerd-shim-colo-v2 $(BIN)/colo && \
	install -D -m 0644 -t $(1)$(GUEST_INSTALL) $(GUEST)/vmlinux $(GUEST)/initrd.img deploy/containerd-colo.toml && \
	install -D -m 0644 deploy/config.toml $(1)/etc/colo/config.toml
install-from = @for f in $(INSTALL_FROM); do \
	[ -f $$f ] || { echo "$$f is missing: run make build guest first"; exit 1; }; done

install:
	$(install-from)
	@root=$$(mktemp -d) && trap 'rm -rf $$root' EXIT && $(call stage,$$root) && \
	DESTDIR="$(DESTDIR)" COLO_MANIFEST=$(INSTALL_MANIFEST) deploy/install.sh install $$root

uninstall:
	@DESTDIR="$(DESTDIR)" COLO_MANIFEST=$(INSTALL_MANIFEST) COLO_DEFAULT_CONFIG=deploy/config.toml \
		deploy/install.sh uninstall

# Reproducible: sorted, owner root, every mtime SOURCE_DATE_EPOCH, gzip -n.
dist:
	$(install-from)
	rm -rf $(DIST)/$(DIST_NAME) && mkdir -p $(DIST)/$(DIST_NAME)
	$(call stage,$(DIST)/$(DIST_NAME)/root)
	install -m 0755 -t $(DIST)/$(DIST_NAME) deploy/install.sh deploy/node-setup.sh
	install -D -m 0644 -t $(DIST)/$(DIST_NAME)/kubernetes deploy/kubernetes/*.yaml
	set -o pipefail && tar -C $(DIST) -cf - --sort=name --format=gnu --owner=0 --group=0 --numeric-owner \
		--mode=u+rwX,go=rX --mtime=@$(SOURCE_DATE_EPOCH) $(DIST_NAME) | gzip -n >$(DIST)/$(DIST_NAME).tar.gz.tmp
	mv $(DIST)/$(DIST_NAME).tar.gz.tmp $(DIST)/$(DIST_NAME).tar.gz
	rm -rf $(DIST)/$(DIST_NAME)
	cd $(DIST) && sha256sum $(DIST_NAME).tar.gz >$(DIST_NAME).tar.gz.sha256

clean:
	rm -rf $(BUILD)
