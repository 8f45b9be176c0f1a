# btm: `make` (= `make pack`) builds btm_package.tar.gz; also build, deb,
# image (the OCI image btm-image.tar), test, lint, demo, bench, clean.
# `make test` and `make demo` need root (loop devices, zfs-fuse, a systemd
# container, podman) and install their prerequisites themselves.

CARGO ?= cargo

.PHONY: all pack deb image build test lint demo bench clean

all: pack

pack:
	./scripts/pack.sh

deb:
	./packaging/build-deb.sh

image:
	./scripts/image.sh

build:
	$(CARGO) build --release --locked

test:
	./scripts/test.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --locked --quiet --no-deps --workspace --document-private-items
	shellcheck install.sh scripts/*.sh packaging/*.sh packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm .ci/run
	shellcheck -s sh deploy/kubernetes/examples/export-job/cronjob/export.sh

demo:
	./scripts/demo.sh

bench:
	./scripts/bench-daemon.sh
	./scripts/bench-chunk.sh
	./scripts/bench-remote.sh
	./scripts/bench-sizes.sh
	./scripts/bench-scale.sh
	./scripts/bench-files.sh
	./scripts/bench-export.sh
	./scripts/bench-live.sh
	./scripts/bench-public.sh
	./scripts/bench-kube.sh

clean:
	$(CARGO) clean
	rm -f btm_package.tar.gz btm_*.deb btm-image.tar
