/**
 * The demo's traffic generator: stands for staging's real users. Sends a few requests a second
 * to the service on keep-alive and fresh connections, and prints one JSON line for each answer
 * (`{"method","path","body","from","status"}`, `from` being its own address and port). On
 * SIGTERM or SIGINT it stops sending, waits for the answers still due, closes its connections,
 * prints `{"connections":N}` (how many it opened) and exits. Started as `node traffic.js URL`.
 */
import { Agent, request } from 'node:http';
import type { Socket } from 'node:net';

const [base = 'http://127.0.0.1:8080'] = process.argv.slice(2);
const keepAlive = new Agent({ keepAlive: true, maxSockets: 1 });
const items = ['espresso', 'flat white', 'cortado', 'chai latte', 'mocha'];
const sockets = new WeakSet<Socket>();
let count = 0;
let connections = 0;
let pending = 0;
let stopping = false;

function finishIfDone(): void {
  if (!stopping || pending > 0) return;
  // Closes the keep-alive connection: a FIN, as when a real client leaves.
  keepAlive.destroy();
  console.log(JSON.stringify({ connections }));
  process.exit(0);
}

function send(): void {
  count += 1;
  const order = count % 3 !== 0;
  const body = order
    ? JSON.stringify({ item: items[count % items.length], quantity: (count % 4) + 1 })
    : '';
  const path = order ? '/orders' : `/orders?page=${count}`;
  const method = order ? 'POST' : 'GET';
  pending += 1;
  let settled = false;
  const settle = (): void => {
    if (settled) return;
    settled = true;
    pending -= 1;
    finishIfDone();
  };
  const req = request(
    `${base}${path}`,
    {
      method,
      agent: count % 2 ? keepAlive : false,
      headers: order ? { 'content-type': 'application/json' } : {},
    },
    (res) => {
      const from = `${res.socket.localAddress}:${res.socket.localPort}`;
      console.log(JSON.stringify({ method, path, body, from, status: res.statusCode }));
      res.resume();
      res.on('end', settle);
    },
  );
  req.on('socket', (socket) => {
    if (sockets.has(socket)) return;
    sockets.add(socket);
    connections += 1;
  });
  req.on('error', settle);
  req.end(body);
}

const sender = setInterval(send, 400);
for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  process.on(signal, () => {
    stopping = true;
    clearInterval(sender);
    finishIfDone();
  });
}
