# Thin wrapper around meson/ninja.  `make run` starts the daemon's embedded
# default (or the demo before it exists); `make check` runs every test.
BUILD ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan

.PHONY: all deps run check asan tsan clean bench

all: $(BUILD)/build.ninja
	ninja -C $(BUILD)

deps:
	@sh scripts/install-deps.sh

$(BUILD)/build.ninja:
	meson setup $(BUILD)

$(ASAN_BUILD)/build.ninja:
	meson setup $(ASAN_BUILD) -Db_sanitize=address,undefined -Db_lundef=false

asan: $(ASAN_BUILD)/build.ninja
	ninja -C $(ASAN_BUILD)

$(TSAN_BUILD)/build.ninja:
	meson setup $(TSAN_BUILD) -Db_sanitize=thread -Db_lundef=false

tsan: $(TSAN_BUILD)/build.ninja
	ninja -C $(TSAN_BUILD)

run: deps all
	sh scripts/run-default.sh $(BUILD)

check: deps all asan tsan
	/usr/bin/python3 tests/run.py

bench: deps all
	sh bench/run-all.sh

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD)
