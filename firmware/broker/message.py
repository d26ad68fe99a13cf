# An application message as the broker holds it: one object, shared by
# every queue it sits in. Its wire form is encoded once per protocol
# version and reused for every receiver that needs exactly that form.
import time
from mqtt import props as P
from mqtt.packets import encode_publish, publish_head
from mqtt.wire import put_varint

# Properties forwarded unchanged to receivers (MQTT-3.3.2-*): everything a
# publisher set except Topic Alias (per connection), Subscription Identifier
# (per receiver) and Message Expiry (rewritten with the time left).
# Will Delay belongs to the will, not to the message it becomes.
_NOT_FORWARDED = (P.TOPIC_ALIAS, P.SUBSCRIPTION_ID, P.MESSAGE_EXPIRY, P.WILL_DELAY)


class Message:
    # Defaults on the class keep each instance's attribute table small: a
    # gateway may hold a few hundred of these.
    expires = None  # absolute expiry in time.time() seconds; None: never
    props = None  # forwarded properties
    _pbody = None  # props encoded
    _wire = None  # encoded PUBLISH per (version, retain, QoS > 0)

    def __init__(self, topic, payload, qos, retain, props=None, expiry=None, topic_b=None):
        self.topic = topic
        self.topic_b = topic_b if topic_b is not None else topic.encode("utf-8")
        self.payload = payload
        self.qos = qos
        self.retain = retain
        if expiry is not None:
            self.expires = time.time() + expiry
        if props:
            fwd = None
            for k in props:
                if k not in _NOT_FORWARDED:
                    if fwd is None:
                        fwd = {}
                    fwd[k] = props[k]
            if fwd is not None:
                self.props = fwd

    def expired(self, now):
        return self.expires is not None and now >= self.expires

    def remaining(self, now):
        # Seconds left, at least 1 while not expired (MQTT-3.3.2-6).
        r = int(self.expires - now)
        return r if r > 0 else 1

    def props_body(self):
        if self._pbody is None:
            self._pbody = P.encode_body(self.props) if self.props else b""
        return self._pbody

    def wire(self, version, qos, retain, pid, subids, alias, send_topic, now):
        # The PUBLISH for one receiver. The common case (no subscription
        # identifier, no alias, no expiry) is encoded once per message and
        # version; QoS 1/2 copies it and patches the packet identifier.
        simple = not subids and not alias and self.expires is None
        if simple:
            key = version * 4 + retain * 2
            c = self._wire
            if c is None:
                c = self._wire = {}
            pkt = c.get(key + (1 if qos else 0))
            if pkt is None:
                pkt = encode_publish(self.topic_b, self.payload, qos, retain, False, pid or 1,
                                     self.props_body() if version == 5 else None, version)
                c[key + (1 if qos else 0)] = pkt
            if qos:
                pkt = bytearray(pkt)
                # packet identifier sits right after the topic
                i = _pid_at(pkt, len(self.topic_b))
                pkt[i] = pid >> 8
                pkt[i + 1] = pid & 0xFF
                pkt[0] = (pkt[0] & 0xF9) | (qos << 1)
            return pkt
        tb = self.topic_b if send_topic else b""
        return encode_publish(tb, self.payload, qos, retain, False, pid,
                              self._props_for(version, subids, alias, now), version)

    def head(self, version, qos, retain, pid, subids, alias, send_topic, now, dup=False):
        # The same PUBLISH without its payload, for large messages: the
        # connection sends the payload object itself after it.
        tb = self.topic_b if send_topic else b""
        return publish_head(tb, len(self.payload), qos, retain, dup, pid,
                            self._props_for(version, subids, alias, now), version)

    def _props_for(self, version, subids, alias, now):
        # The v5 property body for one receiver (None before v5).
        if version != 5:
            return None
        if not subids and not alias and self.expires is None:
            return self.props_body()
        extra = bytearray()
        if self.expires is not None:
            extra.append(P.MESSAGE_EXPIRY)
            r = self.remaining(now)
            extra.extend(bytes(((r >> 24) & 0xFF, (r >> 16) & 0xFF, (r >> 8) & 0xFF, r & 0xFF)))
        if alias:
            extra.append(P.TOPIC_ALIAS)
            extra.append(alias >> 8)
            extra.append(alias & 0xFF)
        if subids:
            for s in subids:
                extra.append(P.SUBSCRIPTION_ID)
                put_varint(extra, s)
        return bytes(extra) + self.props_body()


def _pid_at(pkt, topic_len):
    i = 1
    while pkt[i] & 0x80:
        i += 1
    return i + 1 + 2 + topic_len
