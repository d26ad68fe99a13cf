# The dashboard page (docs/dashboard.md).
#   make dashboard-page    regenerate firmware/broker/dashboard_page.py from
#                          firmware/broker/www/dashboard.html, print its sizes
#   make dashboard-test    the dashboard and MQTT-over-WebSocket interop tests
#   make chromium          apt-get install Debian's chromium (make sysdeps
#                          installs it too)
# The page module is committed: a board build needs no Node, no browser and
# no compressor, only what make build needs.

.PHONY: dashboard-page dashboard-test chromium

dashboard-page: ## regenerate firmware/broker/dashboard_page.py from www/dashboard.html (gzip), print sizes
	@$(PYTHON) firmware/broker/www/mkpage --sizes

dashboard-test: venv node-deps chromium ## dashboard + MQTT.js over ws/wss interop tests (installs chromium and npm packages if missing)
	@$(PY) -m pytest -q $(PYTEST_ARGS) host_tests/test_dashboard.py host_tests/test_ws_mqtt_interop.py

chromium: ## apt-get install chromium (for host_tests/test_dashboard.py) when /usr/bin/chromium is missing
	@if test -x /usr/bin/chromium; then echo "chromium: present"; exit 0; fi; \
	pkgs="chromium"; $(APT_INSTALL)
