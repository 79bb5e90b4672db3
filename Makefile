# hugepoke — see README.md.
#   make run    set up, build, boot our kernel and show the demo
#   make check  set up, build, run every test; ends with "N passed, N failed"
#   make        build the module against our (already built) kernel

SHELL := bash
.DEFAULT_GOAL := module
KDIR ?= $(shell bash -c '. scripts/env.sh && echo $$HP_KDIR')

.PHONY: module samples setup kernel run check bench clean

module:
	@test -f $(KDIR)/Module.symvers || { echo "no kernel in $(KDIR): run 'make kernel' first" >&2; exit 1; }
	$(MAKE) -C $(KDIR) M=$(CURDIR) LLVM= CC=gcc modules

samples:
	cd samples && cargo build --release --locked --quiet

setup:
	scripts/setup

kernel: setup
	scripts/build-kernel

run: kernel
	$(MAKE) module samples
	scripts/guest -- samples/demo

check: kernel
	scripts/check

clean:
	$(MAKE) -C $(KDIR) M=$(CURDIR) LLVM= CC=gcc clean
	cd samples && cargo clean
