# hugepoke — see README.md.
#   make run    set up, build, boot our kernel and show the demo
#   make check  set up, build, run every test; ends with "N passed, N failed"
#   make selftests  the kernel's mm selftests without the module, with a patch held, with cycles
#   make soak   the model-based test for SOAK_SECONDS (600)
#   make        build the module against our (already built) kernel
#   make fmt    format the module (the kernel's rustfmt settings) and the samples
#   make install-tools [PREFIX=/usr/local] [DESTDIR=]   the CLI, thp-target, man pages and completions, for the host
#   HP_KFLAVOUR=debug (or make check HP_KFLAVOUR=debug): the lockdep/DEBUG_PAGEALLOC kernel

SHELL := bash
.DEFAULT_GOAL := module
HP_KFLAVOUR ?= base
export HP_KFLAVOUR
KDIR ?= $(shell HP_KFLAVOUR=$(HP_KFLAVOUR) bash -c '. scripts/env.sh && echo $$HP_KDIR')
KMAKE ?= $(shell HP_KFLAVOUR=$(HP_KFLAVOUR) bash -c '. scripts/env.sh && echo $$HP_KMAKE')

.PHONY: module samples install-tools setup kernel run check selftests soak bench stress clean fmt

module:
	@test -f $(KDIR)/Module.symvers || { echo "no kernel in $(KDIR): run 'make kernel' first" >&2; exit 1; }
	$(MAKE) -C $(KDIR) M=$(CURDIR) $(KMAKE) modules

samples:
	cd samples && cargo build --release --locked --quiet

# Format the module (the kernel's rustfmt settings) and the samples.
fmt:
	rustfmt --edition 2021 src/module.rs
	cd samples && cargo fmt

# The CLI outside the guest: binaries, man pages (hugepoke.1, hugepoke-SUB.1),
# bash/zsh/fish completions, under $(DESTDIR)$(PREFIX).
PREFIX ?= /usr/local
install-tools:
	PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" scripts/install-tools

setup:
	scripts/setup

kernel: setup
	scripts/build-kernel $(HP_KFLAVOUR)

run: kernel
	$(MAKE) module samples
	scripts/guest -- samples/demo

# Both flavours unless one is named: make check HP_KFLAVOUR=debug
check: setup
	HP_KFLAVOURS="$(if $(filter command line environment,$(origin HP_KFLAVOUR)),$(HP_KFLAVOUR),base debug)" scripts/check

# The kernel's mm selftests with and without the module (debug flavour unless one is named).
selftests: setup
	HP_KFLAVOUR="$(if $(filter command line environment,$(origin HP_KFLAVOUR)),$(HP_KFLAVOUR),debug)" scripts/selftests

# The model-based test for as long as asked: make soak SOAK_SECONDS=3600
soak: kernel
	scripts/soak

bench: kernel
	scripts/bench

stress: kernel
	scripts/stress

clean:
	$(MAKE) -C $(KDIR) M=$(CURDIR) $(KMAKE) clean
	cd samples && cargo clean
