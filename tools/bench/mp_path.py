# The functions a forwarded message goes through, for the benchmark's
# run-time wrappers on the twin: mp_profile.py times them, mp_alloc.py
# counts what they allocate. Runs under MicroPython. Each entry is
# (module of broker/, class or None, name, label); a name a module imports
# from another is wrapped where it is called, so it is listed there (and
# entries of one label add up: Output.reserve is a method, and a function
# in route.py and pump.py).
import sys

PUBLISH = (
    ("conn", "Connection", "_take", "Connection._take"),
    ("conn", "Connection", "dispatch", "Connection.dispatch"),
    ("conn", None, "frame", "frame (mqtt.packets; lengths over 127 only)"),
    ("conn", None, "on_publish", "on_publish"),
    ("handle_publish", None, "decode_publish", "decode_publish"),
    ("handle_publish", None, "valid_topic", "valid_topic"),
    ("handle_publish", None, "topic_fits", "topic_fits"),
    ("heap", "Heap", "room_for", "Heap.room_for"),
    ("handle_publish", None, "Message", "Message()"),
    ("handle_publish", None, "route", "route"),
    ("subs", "Subs", "match", "Subs.match"),
    ("route", None, "_copy", "_copy (a QoS 0 message as it came)"),
    ("route", None, "_route_many", "_route_many"),
    ("route", None, "deliver", "deliver"),
    ("route", None, "put_message", "put_message (from route)"),
    ("pump", None, "put_message", "put_message (from pump)"),
    ("conn", None, "pump", "pump (queue to output)"),
    ("message", "Message", "size", "Message.size"),
    ("message", "Message", "put", "Message.put"),
    ("session", "Session", "enqueue", "Session.enqueue"),
    ("outbuf", "Output", "reserve", "Output.reserve"),
    ("outbuf", "Output", "kick", "Output.kick"),
    ("route", None, "reserve", "Output.reserve"),
    ("route", None, "kick", "Output.kick"),
    ("pump", None, "reserve", "Output.reserve"),
    ("core", "Broker", "flush_now", "Broker.flush_now"),
    ("outbuf", "Output", "service", "Output.service"),
    ("outbuf", "Output", "write_now", "Output.write_now"),
    ("outbuf", "Output", "_drained", "Output._drained"),
)

# What QoS 1/2, acknowledgements and the heap check add.
MORE = (
    ("conn", None, "on_packet", "on_packet (acks, subscribe...)"),
    ("handle_other", None, "_on_ack", "_on_ack"),
    ("handle_other", None, "kick", "Output.kick"),
    ("handle_other", None, "decode_ack", "decode_ack"),
    ("handle_publish", None, "would_hold", "would_hold"),
    ("conn", "Connection", "ack", "Connection.ack (PUBACK, PUBREC...)"),
    ("heap", "Heap", "free", "Heap.free (gc.mem_free; gc.collect when short)"),
    ("session", "Session", "next_pid", "Session.next_pid"),
    ("backpressure", None, "busy", "backpressure.busy"),
    ("outbuf", "Output", "send", "Output.send"),
    ("outbuf", "Output", "room", "Output.room"),
    ("transport", "TcpTransport", "write_now", "TcpTransport.write_now (socket write)"),
)


def wrap_all(entries, make, missing):
    # Replaces each function with make(label, function); labels of names
    # this broker does not have go to `missing`.
    for mod, cls, name, label in entries:
        __import__("broker." + mod)
        obj = sys.modules["broker." + mod]
        if cls is not None:
            obj = getattr(obj, cls, None)
        f = getattr(obj, name, None) if obj is not None else None
        if f is None:
            missing.append(label)
        else:
            setattr(obj, name, make(label, f))
