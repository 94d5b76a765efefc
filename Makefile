# The two commands of the README. Both install what they need (Debian packages) when missing.
#   make run    a dev node with a demo backend and a demo service, no internet needed
#   make test   formatting, lints, every test, and a bounded fuzzing run
# Builds go to CARGO_TARGET_DIR (outside the clone by default) so they stay incremental.

CARGO_TARGET_DIR ?= $(HOME)/.cache/portcullis-target
export CARGO_TARGET_DIR

# command:package pairs each target needs; later capabilities add theirs here.
RUN_DEPS  := curl:curl kill:procps protoc:protobuf-compiler unbound:unbound
TEST_DEPS := curl:curl kill:procps dig:dnsutils knotd:knot pebble:pebble etcd:etcd-server etcdctl:etcd-client protoc:protobuf-compiler unbound:unbound

.PHONY: run test fleet deps-run deps-test deps-fleet build lint bench fuzz

run: deps-run
	cargo build --bin portcullis
	scripts/dev.sh "$(CARGO_TARGET_DIR)/debug/portcullis"

# Three etcd members and three nodes on loopback: the fleet, to try by hand.
fleet: deps-fleet
	cargo build --bin portcullis
	scripts/fleet.sh "$(CARGO_TARGET_DIR)/debug/portcullis"

test: deps-test
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	scripts/nextest.sh run --workspace --no-fail-fast
	scripts/fuzz.sh

build:
	cargo build --release --bin portcullis

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fuzz:
	FUZZ_SECONDS=$${FUZZ_SECONDS:-600} scripts/fuzz.sh

bench:
	cargo bench -p portcullis-benches

deps-run:
	@scripts/deps.sh $(RUN_DEPS)

deps-test:
	@scripts/deps.sh $(TEST_DEPS)

deps-fleet:
	@scripts/deps.sh $(RUN_DEPS) etcd:etcd-server etcdctl:etcd-client dig:dnsutils
