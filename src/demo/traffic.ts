/**
 * The demo's traffic generator: stands for staging's real users. Sends a few requests a second
 * to the service on keep-alive and fresh connections. Started as `node traffic.js URL`.
 */
import { Agent, request } from 'node:http';

const [base = 'http://127.0.0.1:8080'] = process.argv.slice(2);
const keepAlive = new Agent({ keepAlive: true, maxSockets: 1 });
const items = ['espresso', 'flat white', 'cortado', 'chai latte', 'mocha'];
let count = 0;

function send(): void {
  count += 1;
  const order = count % 3 !== 0;
  const body = order
    ? JSON.stringify({ item: items[count % items.length], quantity: (count % 4) + 1 })
    : '';
  const path = order ? '/orders' : `/orders?page=${count}`;
  const req = request(
    `${base}${path}`,
    {
      method: order ? 'POST' : 'GET',
      agent: count % 2 ? keepAlive : false,
      headers: order ? { 'content-type': 'application/json' } : {},
    },
    (res) => res.resume(),
  );
  req.on('error', () => undefined);
  req.end(body);
}

setInterval(send, 400);
