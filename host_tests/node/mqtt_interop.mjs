// MQTT.js over WebSocket against the broker, driven by
// host_tests/test_ws_mqtt_interop.py (a paho client sits on TCP).
//   node mqtt_interop.mjs URL PREFIX VERSION EXPECT [CA_PEM]
// Connects to URL (ws:// or wss://, CA_PEM for wss), subscribes to
// PREFIX/to_node/# at QoS 2, publishes the messages of messages("node")
// to PREFIX/to_paho/q<QoS>/<i> at their QoS and waits for each
// acknowledgement, prints {"ready": true}, then waits until EXPECT messages
// have arrived and prints {"received": [[topic, qos, base64 payload]...]}.
// Exit status 0 when all that worked; one JSON line with "error" otherwise.
import { readFileSync } from "node:fs";
import mqtt from "mqtt";

const [url, prefix, version, expect, caFile] = process.argv.slice(2);
const want = Number(expect);

function out(o) { console.log(JSON.stringify(o)); }
let done = false;
function fail(why) {
  if (done) return; // after the result: only the goodbye can fail
  out({ error: String(why) });
  process.exit(1);
}
setTimeout(() => fail("timeout"), 30000).unref();

// The same list as messages() in the test: three per QoS, one of them
// binary and larger than the broker's 512-byte read buffer.
export function messages(who) {
  const list = [];
  for (const q of [0, 1, 2]) {
    list.push([q, 0, Buffer.from(`${who} q${q} first`)]);
    list.push([q, 1, Buffer.from(`${who} q${q} \u00e9\u4e2d`)]);
    const big = Buffer.alloc(3000);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7 + q) & 255;
    list.push([q, 2, big]);
  }
  return list;
}

const opts = {
  protocolVersion: Number(version),
  clientId: `node-${process.pid}`,
  clean: true,
  reconnectPeriod: 0,
  connectTimeout: 10000,
  keepalive: 30,
};
if (caFile) opts.ca = readFileSync(caFile);
// The broker refuses anonymous clients, as a board ships: the test passes
// the test user's credentials in the environment.
if (process.env.MQTT_USERNAME) {
  opts.username = process.env.MQTT_USERNAME;
  opts.password = process.env.MQTT_PASSWORD;
}

const received = [];
const client = mqtt.connect(url, opts);
client.on("error", (e) => fail(e));
client.on("close", () => fail(`closed after ${received.length} messages`));
client.on("message", (topic, payload, packet) => {
  received.push([topic, packet.qos, Buffer.from(payload).toString("base64")]);
  if (received.length === want) {
    out({ received });
    done = true;
    // Let the last QoS 2 exchange (PUBREL, PUBCOMP) finish before DISCONNECT.
    setTimeout(() => client.end(false, () => process.exit(0)), 300);
  }
});
client.on("connect", async () => {
  try {
    const granted = await client.subscribeAsync(`${prefix}/to_node/#`, { qos: 2 });
    if (granted[0].qos !== 2) fail(`granted ${JSON.stringify(granted)}`);
    for (const [q, i, p] of messages("node")) {
      await client.publishAsync(`${prefix}/to_paho/q${q}/${i}`, p, { qos: q });
    }
    out({ ready: true });
  } catch (e) {
    fail(e);
  }
});
