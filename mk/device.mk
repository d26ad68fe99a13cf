# Device targets: put the broker on a board over its serial port.
#   make deploy  BOARD=esp32 PORT=/dev/ttyUSB0 [CONFIG=c.json] [SECRETS=s.json] [DEPLOY_FLAGS=--force]
#   make flash   BOARD=esp32 PORT=/dev/ttyUSB0 FIRMWARE=micropython.bin [CONFIG=...] [SECRETS=...]
#   make console PORT=/dev/ttyUSB0
#   make firmware BOARD=esp32 MICROPYTHON_SRC=/path/to/micropython [FIRMWARE_FLAGS=--dry-run]
#   make package-json
# PORT is the serial port here (mk/run.mk uses PORT for a TCP port). BOARD
# must be given on the command line or in the environment: a default board
# would put the wrong native code (.mpy architecture) on the wrong chip.
# Missing values stop make at once with a message, before anything runs.

DEVICE_DIR := $(patsubst %/mk/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
DEVICE_PY := $(DEVICE_DIR)/.venv/bin/python
DEVICE_MPREMOTE := $(DEVICE_DIR)/.venv/bin/mpremote
DEVICE_BOARDS := $(sort $(basename $(notdir $(wildcard $(DEVICE_DIR)/boards/*.json))))
DEPLOY_FLAGS ?=
FLASH_FLAGS ?=

ifneq ($(filter deploy flash console,$(MAKECMDGOALS)),)
ifeq ($(strip $(PORT)),)
$(error PORT is not set: give the board's serial port, e.g. make $(firstword $(filter deploy flash console,$(MAKECMDGOALS))) PORT=/dev/ttyUSB0 (Linux ESP32), /dev/ttyACM0 (Pico W, ESP32-S3 USB); `.venv/bin/mpremote connect list` lists the ports)
endif
endif
ifneq ($(filter deploy flash firmware,$(MAKECMDGOALS)),)
ifeq ($(filter command line environment,$(origin BOARD)),)
$(error BOARD is not set: give it on the command line, one of: $(DEVICE_BOARDS))
endif
endif
ifneq ($(filter flash,$(MAKECMDGOALS)),)
ifeq ($(strip $(FIRMWARE)),)
$(error FIRMWARE is not set: give the MicroPython firmware file, e.g. make flash BOARD=$(BOARD) PORT=$(PORT) FIRMWARE=ESP32_GENERIC-v1.26.1.bin)
endif
endif

# A serial port given as a path must exist: checked here, before the venv
# prerequisite may spend a minute in pip (not with --dry-run).
ifneq ($(filter deploy flash console,$(MAKECMDGOALS)),)
ifeq ($(filter --dry-run,$(DEPLOY_FLAGS) $(FLASH_FLAGS)),)
ifneq ($(filter /%,$(PORT)),)
ifeq ($(wildcard $(PORT)),)
$(error serial port $(PORT) does not exist. Check that the board is plugged in with a data cable and powered, that you may open the port (Linux: the dialout group), and which ports exist: `.venv/bin/mpremote connect list`)
endif
endif
endif
endif

DEVICE_USER_FILES = $(if $(CONFIG),--config $(CONFIG)) $(if $(SECRETS),--secrets $(SECRETS)) $(if $(PASSWD),--passwd $(PASSWD))
FIRMWARE_FLAGS ?=

.PHONY: deploy flash console package-json firmware

deploy: venv ## copy the broker to a board: make deploy BOARD=esp32 PORT=/dev/ttyUSB0 [CONFIG=..] [SECRETS=..] [PASSWD=..]
	@$(DEVICE_PY) $(DEVICE_DIR)/tools/deploy.py --board $(BOARD) --port $(PORT) $(DEVICE_USER_FILES) $(DEPLOY_FLAGS)

flash: venv ## flash MicroPython, then deploy: make flash BOARD=esp32 PORT=.. FIRMWARE=fw.bin
	@$(DEVICE_PY) $(DEVICE_DIR)/tools/flash.py --board $(BOARD) --port $(PORT) --firmware $(FIRMWARE) $(DEVICE_USER_FILES) $(FLASH_FLAGS)

console: venv ## the board's REPL (Ctrl-] leaves): make console PORT=/dev/ttyUSB0
	@$(DEVICE_PY) $(DEVICE_DIR)/tools/deploy.py --check-port $(PORT)
	@$(DEVICE_MPREMOTE) connect $(PORT) resume repl

firmware: venv ## MicroPython with the broker frozen in: make firmware BOARD=esp32 MICROPYTHON_SRC=/path/to/micropython
	@$(DEVICE_PY) $(DEVICE_DIR)/tools/firmware.py --board $(BOARD) $(if $(MICROPYTHON_SRC),--src $(MICROPYTHON_SRC)) $(FIRMWARE_FLAGS)

package-json: venv ## regenerate package.json (for mpremote mip install) from lib/ and firmware/
	@$(DEVICE_PY) $(DEVICE_DIR)/tools/deploy.py --write-package-json
