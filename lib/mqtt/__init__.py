# MQTT 3.1.1 / 5.0 codec shared by the broker firmware and the host tools.
# Runs unchanged under CPython and MicroPython.
