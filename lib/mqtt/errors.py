# The one error type the codec raises. `reason` is the MQTT 5 reason code
# that fits the problem; a 3.1.1 broker maps it to closing the connection.
from mqtt.compat import const

MALFORMED = const(0x81)
PROTOCOL_ERROR = const(0x82)
UNSUPPORTED_VERSION = const(0x84)
CLIENT_ID_INVALID = const(0x85)
TOPIC_NAME_INVALID = const(0x90)
PACKET_TOO_LARGE = const(0x95)
PAYLOAD_FORMAT_INVALID = const(0x99)


class MQTTError(Exception):
    def __init__(self, reason, msg=""):
        super().__init__(reason, msg)
        self.reason = reason
        self.msg = msg

    def __str__(self):
        return "0x%02X %s" % (self.reason, self.msg)
