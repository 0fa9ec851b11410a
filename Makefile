# MailTier — the two commands: `make run` and `make test`.
SHELL := /bin/bash

# Where `make run` keeps its state (embedded mode: SQLite, spool, maildirs, a self-signed certificate).
DATA ?= $(CURDIR)/data

.PHONY: run test deps build release clean services-start services-stop cluster cluster-stop cluster-status bench bench-smoke

deps:
	@scripts/install-deps.sh

build: deps
	swift build

release: deps
	swift build -c release

## Builds and starts embedded mode on port 2525 (STARTTLS with a self-signed certificate,
## AUTH required). Any SMTP_* variable you set overrides these.
run: build
	@mkdir -p $(DATA)/tls
	@[ -f $(DATA)/tls/cert.pem ] || openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=localhost" \
		-addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
		-keyout $(DATA)/tls/key.pem -out $(DATA)/tls/cert.pem 2>/dev/null
	SMTP_DB_PATH=$${SMTP_DB_PATH:-$(DATA)/smtp.db} \
	SMTP_STORAGE_PATH=$${SMTP_STORAGE_PATH:-$(DATA)/mail} \
	SMTP_SPOOL_PATH=$${SMTP_SPOOL_PATH:-$(DATA)/spool} \
	SMTP_ENABLE_TLS=$${SMTP_ENABLE_TLS:-true} \
	SMTP_TLS_CERT=$${SMTP_TLS_CERT:-$(DATA)/tls/cert.pem} \
	SMTP_TLS_KEY=$${SMTP_TLS_KEY:-$(DATA)/tls/key.pem} \
	SMTP_LOCAL_DOMAINS=$${SMTP_LOCAL_DOMAINS:-example.com} \
	.build/debug/smtp-server

## Installs what the tests need, builds, starts the real services on 127.0.0.1 (PostgreSQL, Redis,
## SeaweedFS S3), runs every test against them, and stops them.
test: deps
	swift build --build-tests
	scripts/test-services.sh start
	set -a; . .test-services/env; set +a; \
	MAILTIER_REQUIRE_SERVICES=1 swift test; status=$$?; \
	scripts/test-services.sh stop; exit $$status

## Starts / stops the test services by hand (state in .test-services/).
services-start:
	scripts/test-services.sh start
services-stop:
	scripts/test-services.sh stop

## A cluster on one machine: PostgreSQL, Redis, SeaweedFS, haproxy (send-proxy-v2) in front of
## two ingress nodes, and a delivery node, all on 127.0.0.1 (state and logs in .cluster/).
cluster: build
	scripts/cluster.sh start
cluster-stop:
	scripts/cluster.sh stop
cluster-status:
	scripts/cluster.sh status

## Benchmarks (README "Performance"): builds release, then ours (embedded mode), a private Postfix
## and smtp-sink under the same loads on 127.0.0.1; JSON, a chart and a table in bench/results/.
bench:
	scripts/bench.sh

## The same scenarios with tiny counts against the debug build (seconds; no thresholds).
bench-smoke: build
	scripts/bench.sh --smoke

clean:
	-scripts/cluster.sh stop
	-scripts/test-services.sh stop
	rm -rf .build $(DATA) .test-services .cluster
