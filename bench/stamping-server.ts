/**
 * The HTTP server of `bench -- mirror`, as the target and as the local app: it answers every
 * request with a few bytes and notes when each arrived, keyed by the client's port and the
 * request's position on its connection (warm-up requests of the load generator are answered but not
 * noted). Under mirrord the local app sees the original client's port (the layer's getpeername),
 * so the two sides' keys meet.
 *
 * `node stamping-server.js HOST PORT STAMPS_FILE`: once listening, prints `count N` (the noted
 * requests) every 200 ms; on SIGTERM or SIGINT writes `key arrivalMicros` lines (CLOCK_MONOTONIC, as in src/protocol/clock.ts) to
 * STAMPS_FILE and exits.
 */
import { writeFileSync } from 'node:fs';
import http from 'node:http';
import { monotonicMicros } from '../src/protocol/clock.js';
import { WARMUP_PATH } from './support.js';

const [host = '0.0.0.0', port = '8080', stampsFile = '/dev/null'] = process.argv.slice(2);
const keys: string[] = [];
const arrivals: number[] = [];
const requestsOn = new WeakMap<object, number>();

const server = http.createServer((request, response) => {
  if (request.url === WARMUP_PATH) {
    request.resume();
    request.on('end', () => response.end('ok'));
    return;
  }
  const socket = request.socket;
  const position = requestsOn.get(socket) ?? 0;
  requestsOn.set(socket, position + 1);
  keys.push(`${socket.remotePort}:${position}`);
  arrivals.push(monotonicMicros());
  request.resume();
  request.on('end', () => response.end('ok'));
});
server.keepAliveTimeout = 60_000;
// Counts start once it listens: its first line says that it does.
let counter: NodeJS.Timeout | undefined;
server.listen(Number(port), host, () => {
  counter = setInterval(() => process.stdout.write(`count ${keys.length}\n`), 200);
});

function finish(): void {
  clearInterval(counter);
  writeFileSync(stampsFile, keys.map((key, i) => `${key} ${arrivals[i]}`).join('\n'));
  process.exit(0);
}
process.on('SIGTERM', finish);
process.on('SIGINT', finish);
