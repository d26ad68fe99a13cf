# Benchmarks and simulation (tools/bench, tools/sim; docs/benchmarks.md, docs/sim.md).
#   make bench [BENCH_SECONDS=3] [BENCH_REPEAT=3]    ours (host and twin) vs mosquitto vs amqtt,
#                                                    profile, memory -> docs/benchmarks.md
#   make memreport                                   memory on the board twin per board ->
#                                                    docs/memory.json, docs/memory.md and the docs,
#                                                    then make capacity
#   make capacity                                    how many retained topics, sessions, queued
#                                                    messages, clients fit per board, on the twin ->
#                                                    docs/capacity.json, its section of docs/memory.md
#   make sim [BOARD=pico_w] [SECONDS=20] [SIM_ARGS="--fault kill9@8 ..."] [SIM_OUT=build/sim]
#   make sim-docs                                    docs/sim.md's example (4 runs on pico_w) ->
#                                                    docs/sim.json, its table in docs/sim.md, docs/sim.png
#   make doc-figures                                 the store's, dashboard's, auth's and codec's figures on
#                                                    the twin -> docs/storebench.json, dashboard.json,
#                                                    partsmem.json and their parts of the docs
# amqtt and matplotlib live in their own venv (build/bench-venv, pinned in
# tools/bench/requirements-amqtt.txt), created here, never in .venv.

BENCH_VENV := build/bench-venv
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.requirements.stamp
BENCH_SECONDS ?= 3
BENCH_REPEAT ?= 3
SECONDS ?= 20
SIM_OUT ?= build/sim
SIM_ARGS ?= --retain --awake 3 --asleep 1 --fault kill9@$$(( $(SECONDS) * 2 / 5 )) --fault stall@$$(( $(SECONDS) * 7 / 10 )):sub0:3
SIM_BOARD = $(if $(filter command line environment,$(origin BOARD)),$(BOARD),pico_w)

.PHONY: bench memreport capacity sim sim-docs bench-venv

bench-venv: $(BENCH_STAMP)

$(BENCH_STAMP): tools/bench/requirements-amqtt.txt
	@test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	@echo "bench-venv: pip install -r tools/bench/requirements-amqtt.txt into $(BENCH_VENV)"
	@set -o pipefail; $(BENCH_PY) -m pip install -q --disable-pip-version-check -r tools/bench/requirements-amqtt.txt 2>&1 \
	  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@touch $@

# One run id for the three tools: report.py writes docs/benchmarks.md only
# from files of one run.
bench: venv sysdeps twin bench-venv ## ours (host, twin) vs mosquitto vs amqtt + profile + memory -> docs/benchmarks.md (~10 min)
	@export BENCH_RUN_ID=$$(date -u +%Y%m%dT%H%M%SZ); echo "bench: run $$BENCH_RUN_ID"; \
	$(BENCH_PY) tools/bench/bench.py --seconds $(BENCH_SECONDS) --repeat $(BENCH_REPEAT) --amqtt $(BENCH_VENV)/bin/amqtt \
	&& $(BENCH_PY) tools/bench/profile.py --seconds $(BENCH_SECONDS) \
	&& $(BENCH_PY) tools/bench/benchmem.py \
	&& $(BENCH_PY) tools/bench/report.py

memreport: venv sysdeps twin ## heap on the board twin per board -> docs/memory.json, docs/memory.md, README tables, then capacity (~25 min)
	@$(PY) tools/bench/memreport.py
	@$(PY) tools/bench/capacity.py

capacity: venv sysdeps twin ## how many retained topics, sessions, queued messages, clients fit per board -> docs/capacity.json, docs/memory.md (~4 min)
	@$(PY) tools/bench/capacity.py

sim: venv bench-venv ## sensor network simulation: make sim [BOARD=pico_w] [SECONDS=20] [SIM_ARGS=...]
	@$(BENCH_PY) tools/sim/sim.py --board $(SIM_BOARD) --seconds $(SECONDS) --out $(SIM_OUT) $(SIM_ARGS)

sim-docs: venv twin bench-venv ## docs/sim.md's example, run for real -> docs/sim.json, its table, docs/sim.png (~3 min)
	@$(BENCH_PY) tools/sim/examples.py

# The measured figures of docs/store.md, docs/dashboard.md, docs/security.md
# and lib/README.md (tools/README.md, "Measured figures in the docs").
.PHONY: doc-figures
doc-figures: venv sysdeps twin ## store, dashboard, auth and codec figures on the twin -> docs/*.json and their docs (~2 min)
	@$(PY) tools/wear/storebench.py
	@$(PY) tools/bench/dashsizes.py
	@$(PY) tools/bench/partsmem.py
