# Everything runs from here; caches live outside the clone so warm runs are fast.
SHELL := /bin/bash
export PREVIEW_CACHE ?= /var/cache/preview-env
export CARGO_TARGET_DIR ?= $(PREVIEW_CACHE)/target
export PREVIEW_STATE ?= /var/lib/preview-cluster
export KUBECONFIG ?= $(PREVIEW_STATE)/admin.kubeconfig
IMAGES := $(PREVIEW_CACHE)/images
RELEASE := $(CARGO_TARGET_DIR)/release

.PHONY: tools generate generate-check install-previewd uninstall-previewd fuzz fuzz-tools chaos lint deps k8s cluster-up cluster-api cluster-down cluster-status build images test test-unit test-cluster-lifecycle bench-core demo bench-agent bench-start bench-gateway screenshots kafka-up kafka-down bench-kafka db-up db-down queues-up queues-down bench-queues

deps:               ## install system packages (Debian)
	deploy/local/install-deps.sh

k8s: deps           ## build Kubernetes v1.34 from the Go module proxy (cached)
	deploy/local/build-k8s.sh

cluster-up: k8s     ## start the local single-node cluster (idempotent)
	deploy/local/cluster.sh up

cluster-api: k8s    ## start etcd + apiserver + controller-manager only
	deploy/local/cluster.sh up --api-only

cluster-down:
	deploy/local/cluster.sh down

cluster-status:
	deploy/local/cluster.sh status

# Kafka 4.x (KRaft) on the node address, as a managed Kafka outside the
# cluster: jars from Maven Central, cached; the split-queue tests use it.
kafka-up:
	deploy/local/kafka.sh up

kafka-down:
	deploy/local/kafka.sh down

# Staging's SQS (ElasticMQ, jars from Maven Central, :9324) and RabbitMQ
# (Debian's rabbitmq-server, :5672) on the node address: the brokers of
# SQS and RabbitMQ splitting (tests/queues.rs).
queues-up:
	deploy/local/queues.sh up

queues-down:
	deploy/local/queues.sh down

# Staging's PostgreSQL 15 and MariaDB 10.11 on the node address: the
# sources of database branches (tests/db.rs).
db-up:
	deploy/local/databases.sh up

db-down:
	deploy/local/databases.sh down

build: deps
	cargo build --release --bins

# The agent runs iptables (nft backend; it dlopens its match and target
# extensions) and conntrack, taken from the Debian packages on this machine.
XT := /usr/lib/x86_64-linux-gnu/xtables
AGENT_TOOLS := /usr/sbin/xtables-nft-multi=/usr/bin/iptables-nft \
  /usr/sbin/xtables-nft-multi=/usr/bin/iptables-nft-restore /usr/sbin/conntrack=/usr/bin/conntrack \
  $(foreach x,standard tcp REDIRECT owner mark comment conntrack,$(XT)/libxt_$(x).so)

# The branch server (database branches): Debian's PostgreSQL 15 server,
# its modules (but the LLVM JIT's), its share files and the UTC zone, and a
# data directory initdb made (the entrypoint copies it: faster than initdb).
PG := /usr/lib/postgresql/15
PG_FILES = $(PG)/bin/postgres /bin/cp /bin/chmod /bin/mv /bin/rm \
  $(filter-out $(PG)/lib/llvmjit.so,$(wildcard $(PG)/lib/*.so)) /usr/share/postgresql/15 \
  /usr/share/zoneinfo/UTC /usr/share/zoneinfo/Etc/UTC /usr/share/zoneinfo/GMT

# The MariaDB branch server: Debian's MariaDB 10.11 server, its messages,
# character sets and the system tables' SQL (as mariadb-install-db feeds it).
MY_SHARE := /usr/share/mysql
MY_FILES = /usr/sbin/mariadbd $(MY_SHARE)/english $(MY_SHARE)/charsets \
  $(foreach f,mysql_system_tables mysql_performance_tables mysql_system_tables_data maria_add_gis_sp_bootstrap,$(MY_SHARE)/$(f).sql) \
  /bin/cat /bin/rm

# previewd copies a branch's source with the engines' own tools: Debian's,
# of the servers' versions, where previewd looks for them.
DB_TOOLS := $(PG)/bin/pg_dump $(PG)/bin/psql /usr/bin/mariadb-dump /usr/bin/mariadb

# Images from local files, imported into the cluster's containerd.
images: build cluster-up
	@mkdir -p $(IMAGES)
	@for v in v1 v2; do \
	  deploy/local/image.sh build $(IMAGES)/echo-$$v.tar preview.local/echo:$$v /usr/local/bin/preview-echo \
	    --env ECHO_VERSION=$$v $(RELEASE)/preview-echo=/usr/local/bin/preview-echo >/dev/null; done
	deploy/local/image.sh build $(IMAGES)/previewd.tar preview.local/previewd:dev /usr/local/bin/previewd \
	  $(RELEASE)/previewd=/usr/local/bin/previewd $(RELEASE)/preview=/usr/local/bin/preview $(DB_TOOLS) >/dev/null
	deploy/local/image.sh build $(IMAGES)/agent.tar preview.local/agent:dev /usr/local/bin/preview-agent \
	  $(RELEASE)/preview-agent=/usr/local/bin/preview-agent $(AGENT_TOOLS) >/dev/null
	deploy/local/db/postgres-template.sh $(IMAGES)/pg-data
	deploy/local/image.sh build $(IMAGES)/postgres.tar preview.local/postgres:15 /usr/local/bin/postgres-server \
	  --env TZ=UTC deploy/local/db/postgres-server.sh=/usr/local/bin/postgres-server /bin/dash=/bin/sh $(PG_FILES) \
	  $(IMAGES)/pg-data=/usr/share/preview-db/pg-data >/dev/null
	deploy/local/image.sh build $(IMAGES)/mariadb.tar preview.local/mariadb:10.11 /usr/local/bin/mariadb-server \
	  --env TZ=UTC deploy/local/db/mariadb-server.sh=/usr/local/bin/mariadb-server /bin/dash=/bin/sh $(MY_FILES) >/dev/null
	CONTAINERD_ADDRESS=/run/preview-cluster/containerd/containerd.sock deploy/local/image.sh import \
	  $(IMAGES)/echo-v1.tar $(IMAGES)/echo-v2.tar $(IMAGES)/previewd.tar $(IMAGES)/agent.tar $(IMAGES)/postgres.tar \
	  $(IMAGES)/mariadb.tar

tools: deps         ## pinned generators, grpcurl and the Python test venv (cached)
	clients/tools.sh

# One target regenerates everything made from proto/: the Go and Python
# clients (checked in) and the Rust code (build.rs, at every build).
generate: tools
	clients/generate.sh
	cargo build --quiet --lib

# CI: the checked-in clients must equal a fresh generation.
generate-check: tools
	clients/generate.sh --check

# previewd in the local cluster from deploy/previewd (fresh store).
install-previewd: images
	deploy/local/previewd.sh install

uninstall-previewd:
	deploy/local/previewd.sh uninstall

# What runs on a laptop with no cluster and no root: unit tests, the API over
# an in-memory transport, the manager against a mocked API server, and the
# layout rules. Tests that need the cluster or root are listed as ignored.
test-unit:
	cargo test --no-fail-fast

# rustfmt and clippy are installed by `deps` (rustup components); a missing
# one fails here, it is never skipped.
lint: deps          ## formatting and clippy, warnings are errors
	cargo fmt --check
	cargo clippy --all-targets --features system-tests --quiet -- -D warnings

# The whole suite: every tier (unit, API, manager, layout, then the tests that
# need the cluster or root, with the system-tests feature; parallel, one
# namespace each), then the tests that must run alone (chaos case 3 restarts
# the API server), then the cluster's own down/up lifecycle checks.
test: lint generate-check images kafka-up db-up queues-up
	cargo test --features system-tests --no-fail-fast -- --test-threads 4
	cargo test --features system-tests --test chaos -- --ignored --test-threads 1
	deploy/local/test-lifecycle.sh

bench-core: images
	cargo test --release --features system-tests --test bench_core -- --ignored --nocapture --test-threads 1

bench-gateway: images  ## the share gateway's added p99 at 1k rps and throughput, against the Service direct
	cargo test --release --features system-tests --test bench_gateway -- --ignored --nocapture --test-threads 1

# previewd's Kafka splitter against a plain consume-produce copy loop, on the
# real broker (no cluster needed).
bench-kafka: deps kafka-up
	cargo test --release --features system-tests --test bench_kafka -- --ignored --nocapture --test-threads 1

# previewd's SQS and RabbitMQ splitters against a copy loop of the same
# shape with no routing, on the real brokers (no cluster needed).
bench-queues: deps queues-up
	cargo test --release --features system-tests --test bench_queues -- --ignored --nocapture --test-threads 1

# Database branches: time to Ready of a first branch against pg_dump | psql
# by hand, and of a branch cloned from the snapshot.
bench-db: images db-up  ## a branch's time to Ready, against the same copy by hand
	cargo test --release --features system-tests --test bench_db -- --ignored --nocapture --test-threads 1

# The share test's screenshots, into docs/screenshots (the README shows them).
screenshots: images
	PREVIEW_SCREENSHOTS=$(CURDIR)/docs/screenshots cargo test --features system-tests --test share -- --nocapture

demo: images kafka-up db-up queues-up  ## the main job: a preview of orders on the local cluster
	deploy/demo/demo.sh

# From `preview start` to the first keyed request answered by the preview.
bench-start: images
	cargo test --release --features system-tests --test e2e bench_ -- --ignored --nocapture --test-threads 1

chaos: images       ## the chaos suite on the real cluster (make test runs it too)
	CHAOS_ROUNDS=20 cargo test --features system-tests --test chaos -- --nocapture --test-threads 1 --include-ignored

bench-agent: deps   ## agent vs direct vs nginx, in network namespaces (no cluster needed)
	cargo test --release --features system-tests --test bench_agent -- --ignored --nocapture --test-threads 1

# Coverage-guided fuzzing (nightly toolchain; cargo-fuzz is installed into
# the cache): Start's request checks (config), protocol detection, filter
# matching and the agent's HTTP/1 fast-path parsers. Bounded in time: each
# target runs FUZZ_SECONDS; seeds are in fuzz/seeds/<target>.
CARGO_FUZZ_VERSION := 0.13.2
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= config detect filter h1
fuzz-tools:
	@test -x $(PREVIEW_CACHE)/tools/bin/cargo-fuzz || CARGO_TARGET_DIR=$(PREVIEW_CACHE)/cargo-install-target \
	  cargo install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked --root $(PREVIEW_CACHE)/tools
fuzz: fuzz-tools
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/corpus/$$t; seeds=; [ -d fuzz/seeds/$$t ] && seeds=fuzz/seeds/$$t; \
	  PATH=$(PREVIEW_CACHE)/tools/bin:$$PATH CARGO_TARGET_DIR=$(PREVIEW_CACHE)/fuzz-target \
	    cargo +nightly fuzz run $$t fuzz/corpus/$$t $$seeds -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done
