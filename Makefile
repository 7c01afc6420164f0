# One entry point for every check. CI runs `.ci/run`, which runs `make test`.
CARGO ?= cargo
FUZZ_TIME ?= 20

.PHONY: all build setup test test-rootless test-nested demo lint bench bench-ext4 bench-vm bench-images fuzz-smoke corpus clean

all: build

build:
	$(CARGO) build --workspace

# Tools the tests need (idempotent: returns at once when everything is there).
setup:
	bash scripts/setup.sh

test: setup
	CARGO=$(CARGO) bash scripts/test.sh

# The jail tests, the QEMU box suite and `boxlet run` as an ordinary user (rootless).
test-rootless: setup
	CARGO=$(CARGO) bash scripts/test-rootless.sh

# The KVM backend's tests inside the nested test machine (L1 under TCG with emulated SVM).
test-nested: setup
	bash scripts/test-nested.sh

# Run a box: busybox base disk + agent, qcow2 overlay, QEMU backend (CMD="..." to choose).
demo:
	bash scripts/demo.sh $(CMD)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: setup
	$(CARGO) bench -p boxlet-benches

# ext4 builder against mke2fs -d and tar -x + mke2fs -d (needs root, debootstrap).
bench-ext4: setup
	bash benches/ext4_build.sh

# The store's ingest against sha256sum/b3sum/dd, and a pull against skopeo copy.
bench-images: setup
	bash benches/image_bench.sh

# Boot to agent-ready, `vm run -- true`, exec round trip (medians; names the acceleration).
bench-vm: setup
	bash benches/vm_bench.sh

# Seed corpora for the fuzz targets, generated with qemu-img and boxlet.
corpus: setup
	bash fixtures/qcow2/make-corpus.sh fuzz/corpus
	bash fixtures/ext4/make-corpus.sh fuzz/corpus
	BOXLET_FUZZ_SEEDS_OUT=$(CURDIR)/fuzz/corpus $(CARGO) test -q -p boxlet --test fuzz_replay

fuzz-smoke: corpus
	bash scripts/setup.sh fuzz
	cd fuzz && for t in $$($(CARGO) +nightly fuzz list); do \
		mkdir -p corpus/$$t && \
		$(CARGO) +nightly fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_TIME) || exit 1; \
	done

clean:
	$(CARGO) clean
