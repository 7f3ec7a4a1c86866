/* global process, console, Buffer */
// The app of `bench -- outgoing`, run directly in the target's netns (`ip netns exec`) or under
// `mirrord mirror --netns` (its connects and look-ups through the layer, the CLI and the agent):
// one process does every iteration and prints one JSON line of its timings, so a session's
// set-up is in no figure. `node outgoing-client.mjs PEER BYTES CONNECTS LOOKUPS NAME...`:
// - download BYTES from PEER:7103 and upload BYTES to PEER:7102 (MB/s, from the connect's
//   start to the last byte, or to the sink's count after the app's end);
// - CONNECTS sequential connects to PEER:7101, each until its 17-byte message came back (ms);
// - LOOKUPS sequential getaddrinfo (dns.lookup) of each NAME, which must give PEER (ms).
// A warm-up of each first, unmeasured: a fresh CLI and agent reach their steady speed only after
// about 500 MB (their JIT and heap sizes), so two whole transfers each way go before the measured one.
import dns from 'node:dns/promises';
import net from 'node:net';

const [peer, bytesArg, connectsArg, lookupsArg, ...names] = process.argv.slice(2);
const BYTES = Number(bytesArg);
const CHUNK = Buffer.alloc(1024 * 1024, 0xa5);
const MESSAGE = Buffer.from('ping from the app');
const WARMUP_TRANSFERS = 2;

const now = () => process.hrtime.bigint();
const msSince = (start) => Number(now() - start) / 1e6;

function connect(port, options = {}) {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: peer, port, ...options });
    socket.once('connect', () => resolve(socket));
    socket.once('error', reject);
  });
}

/** MB/s of reading everything the source sends. */
async function download(bytes) {
  const start = now();
  const socket = await connect(7103);
  const count = await new Promise((resolve, reject) => {
    let n = 0;
    socket.on('data', (chunk) => (n += chunk.length));
    socket.on('end', () => resolve(n));
    socket.on('error', reject);
  });
  const seconds = msSince(start) / 1000;
  if (count !== bytes) throw new Error(`downloaded ${count} of ${bytes} bytes`);
  return count / 1e6 / seconds;
}

/** MB/s of sending `bytes` until the sink has counted them all. */
async function upload(bytes) {
  const start = now();
  const socket = await connect(7102, { allowHalfOpen: true });
  const answer = new Promise((resolve, reject) => {
    let text = '';
    socket.on('data', (chunk) => (text += chunk.toString()));
    socket.on('end', () => resolve(text.trim()));
    socket.on('error', reject);
  });
  for (let left = bytes; left > 0; left -= CHUNK.length) {
    const chunk = left >= CHUNK.length ? CHUNK : CHUNK.subarray(0, left);
    if (!socket.write(chunk)) await new Promise((resolve) => socket.once('drain', resolve));
  }
  socket.end();
  const counted = await answer;
  const seconds = msSince(start) / 1000;
  if (counted !== String(bytes)) throw new Error(`the sink counted ${counted} of ${bytes} bytes`);
  return bytes / 1e6 / seconds;
}

/** One connect and the echo of a message written once it is up (an app's first request), in ms. */
async function connectEcho() {
  const start = now();
  const socket = await connect(7101);
  socket.write(MESSAGE);
  const echoed = await new Promise((resolve, reject) => {
    socket.once('data', resolve);
    socket.once('error', reject);
  });
  const ms = msSince(start);
  socket.destroy();
  if (!echoed.equals(MESSAGE)) throw new Error(`the echo answered ${echoed.toString()}`);
  return ms;
}

async function lookup(name) {
  const start = now();
  const addresses = await dns.lookup(name, { all: true });
  const ms = msSince(start);
  if (!addresses.some((a) => a.address === peer)) {
    throw new Error(`${name} resolved to ${JSON.stringify(addresses)}, not ${peer}`);
  }
  return ms;
}

function percentiles(ms) {
  ms.sort((a, b) => a - b);
  const at = (q) => ms[Math.min(ms.length - 1, Math.max(0, Math.ceil(q * ms.length) - 1))];
  return { p50: at(0.5), p99: at(0.99), max: ms.at(-1) };
}

async function times(n, step) {
  const ms = [];
  for (let i = 0; i < n; i++) ms.push(await step());
  return ms;
}

// Warm-up.
for (let i = 0; i < WARMUP_TRANSFERS; i++) {
  await download(BYTES);
  await upload(BYTES);
}
await times(500, connectEcho);
for (const name of names) await times(200, () => lookup(name));

const downloadMbps = await download(BYTES);
const uploadMbps = await upload(BYTES);
const connects = percentiles(await times(Number(connectsArg), connectEcho));
const lookups = {};
for (const name of names)
  lookups[name] = percentiles(await times(Number(lookupsArg), () => lookup(name)));
console.log(JSON.stringify({ downloadMbps, uploadMbps, connects, lookups }));
