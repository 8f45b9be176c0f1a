# btm: build, test, lint, demo. `make test` and `make demo` need root
# (loop devices, zfs-fuse) and install their prerequisites themselves.

CARGO ?= cargo

.PHONY: all build test lint demo bench clean

all: build

build:
	$(CARGO) build --release --locked

test:
	./scripts/test.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

demo:
	./scripts/demo.sh

bench:
	./scripts/bench-daemon.sh
	./scripts/bench-chunk.sh
	./scripts/bench-export.sh

clean:
	$(CARGO) clean
	rm -f btm_package.tar.gz
