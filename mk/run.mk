# make run: the broker in the foreground on this host, on the board twin
# (see tools/broker). PORT here is the TCP port; the device targets use
# PORT for the serial port, so no global default is set for it. Without
# PORT the config's port applies, else 1883 (tools/broker).
BOARD ?= esp32

.PHONY: run
run: venv ## run the broker on the board twin: make run [BOARD=esp32] [PORT=1883] [CONFIG=file.json]
	@$(MAKE) --no-print-directory sysdeps || echo "run: could not install the Debian packages; the twin may not build"
	@$(PY) tools/broker --die-with-parent --board $(BOARD) $(if $(PORT),--port $(PORT)) $(if $(CONFIG),--config $(CONFIG))
