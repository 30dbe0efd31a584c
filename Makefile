# The two commands a newcomer needs: `make run` and `make test`. Everything
# else they need (virtualenv, generated code, the sidecar runner, Debian
# packages, a Docker daemon) is built or started on the way.

PYTHON   ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
INSTALLED := $(VENV)/.installed
GEN      := gen
GEN_STAMP := $(GEN)/.stamp
PROTOS   := $(shell find protos -name '*.proto')
RUNNER   := sidecar/build/sidecar-runner
DATA_DIR ?= .data
LISTEN   ?= 127.0.0.1:8980

RUN_PACKAGES  := docker.io busybox-static curl
TEST_PACKAGES := $(RUN_PACKAGES) bazel-bootstrap bazel-bootstrap-source
# the OpenSSL provider Bazel needs for grpcs:// (Debian's netty has no JDK ALPN)
TEST_PACKAGES += libnetty-tcnative-jni
# The scale-out tests run BuildGrid (own Python >= 3.13 venv) on PostgreSQL 15.
TEST_PACKAGES += postgresql-15
BUILDGRID_VENV := .buildgrid/venv
HOST := deploy/local

.PHONY: run test check lint typecheck unit bench build host-run host-test clean image

build: $(INSTALLED) $(GEN_STAMP) $(RUNNER)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# Generated protobuf/gRPC code lives in gen/ (never edited, never committed)
# and is put on the virtualenv's path with a .pth file.
$(GEN_STAMP): $(PROTOS) $(INSTALLED)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$(GEN) --grpc_python_out=$(GEN) \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --mypy_out=$(GEN) \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(GEN) $(PROTOS)
	$(BIN)/python -c 'import site, os; open(os.path.join(site.getsitepackages()[0], "sidecar_executor_gen.pth"), "w").write(os.path.abspath("$(GEN)") + "\n")'
	touch $@

$(RUNNER): sidecar/runner.c
	mkdir -p $(dir $@)
	gcc -static -O2 -Wall -Wextra -Werror -o $@ $<

host-run:
	$(HOST)/install-host-packages.sh $(RUN_PACKAGES)
	$(HOST)/ensure-dockerd.sh

host-test:
	$(HOST)/install-host-packages.sh $(TEST_PACKAGES)
	$(HOST)/ensure-dockerd.sh
	$(HOST)/install-buildgrid.sh $(BUILDGRID_VENV)

run: build host-run
	$(BIN)/sidecar-executor serve --listen $(LISTEN) --data-dir $(DATA_DIR)

lint: build
	$(BIN)/ruff check
	$(BIN)/ruff format --check

typecheck: build
	$(BIN)/mypy

unit: build
	$(BIN)/pytest -q tests/unit

check: lint typecheck unit

test: build host-test
	$(BIN)/ruff check
	$(BIN)/mypy
	$(BIN)/pytest -q tests

bench: build host-test
	$(BIN)/python -m bench

# The worker image and the pod's Docker daemon image (Debian's docker.io), built with no image
# registry: the base is IMAGE_BASE when given (a Debian 12 image a registry serves, e.g.
# debian:bookworm-slim pinned by digest), else a Debian base made here by debootstrap; Python
# wheels come from the host's pip (deploy/local/image-wheels.sh). --network host: a daemon
# started with --bridge=none (as here) gives build containers no network for apt otherwise.
IMAGE      ?= sidecar-executor:dev
DIND_IMAGE ?= sidecar-executor-dind:dev
IMAGE_BASE ?=
image: $(INSTALLED) host-run
	$(HOST)/install-host-packages.sh debootstrap
	$(HOST)/image-wheels.sh $(BIN)/python
	base="$(IMAGE_BASE)"; [ -n "$$base" ] || base=$$($(HOST)/debian-base-image.sh); \
	docker build -q --network host --build-arg BASE=$$base -f deploy/Dockerfile -t $(IMAGE) . && \
	docker build -q --network host --build-arg BASE=$$base -t $(DIND_IMAGE) deploy/dind
	@docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' $(IMAGE)
	@docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' $(DIND_IMAGE)

clean:
	rm -rf $(VENV) $(GEN) sidecar/build
