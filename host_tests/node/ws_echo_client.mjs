// Interop check of firmware/broker/websocket.py against the `ws` client.
//   node ws_echo_client.mjs ws://127.0.0.1:PORT/mqtt
// Connects offering "mqtt", pings, sends binary messages of 1 B, 1 KiB and
// 70 KiB and waits for the same bytes back (the server echoes a byte stream,
// so the echo may come back in several messages), then closes with 1000.
// Prints one JSON line; exit status 0 when every check passed.
import { randomBytes } from "node:crypto";
import WebSocket from "ws";

const url = process.argv[2];
const sizes = [1, 1024, 70 * 1024];
const result = { protocol: null, pong: false, echoed: [], closeCode: null };

function fail(why) {
  result.error = String(why);
  console.log(JSON.stringify(result));
  process.exit(1);
}

setTimeout(() => fail("timeout"), 15000).unref();

const ws = new WebSocket(url, ["mqtt"]);
let pending = null; // { want, got: [], have, resolve }

ws.on("message", (data, isBinary) => {
  if (!isBinary) fail("text message from server");
  if (!pending) fail("unexpected data");
  pending.got.push(data);
  pending.have += data.length;
  if (pending.have >= pending.want.length) pending.resolve();
});
ws.on("error", fail);

function echo(buf) {
  return new Promise((resolve) => {
    pending = { want: buf, got: [], have: 0, resolve };
    ws.send(buf, { binary: true });
  }).then(() => {
    const back = Buffer.concat(pending.got);
    pending = null;
    if (!back.equals(buf)) fail(`echo of ${buf.length} bytes differs`);
    result.echoed.push(buf.length);
  });
}

ws.on("open", async () => {
  result.protocol = ws.protocol;
  if (ws.protocol !== "mqtt") fail(`protocol ${ws.protocol}`);
  const ping = Buffer.from("ping-payload");
  await new Promise((resolve) => {
    ws.once("pong", (data) => {
      if (!data.equals(ping)) fail("pong payload differs");
      result.pong = true;
      resolve();
    });
    ws.ping(ping);
  });
  for (const n of sizes) await echo(randomBytes(n));
  ws.on("close", (code) => {
    result.closeCode = code;
    if (code !== 1000) fail(`close code ${code}`);
    console.log(JSON.stringify(result));
    process.exit(0);
  });
  ws.close(1000, "bye");
});
