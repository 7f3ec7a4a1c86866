/* global console, process, URL */
// The local app of `mirrord demo`: "your new code". It is the next version of the orders
// service that runs in the demo's sandbox staging (src/demo/service.ts), and it is what you
// would be editing on your laptop. Under mirrord, every request that reaches staging is also
// replayed into it, so it meets real traffic before it is deployed anywhere.
//
//   node examples/orders-app/server.js [PORT]                                  on its own
//   mirrord mirror --netns STAGING -- node examples/orders-app/server.js       under mirrord
//
// Nothing in it knows about mirrord. It listens on the port staging's service listens on;
// mirrord's layer (preloaded into it) reports that port, so that port is the one mirrored, and
// makes each connection look as if it came straight from staging's client. Its answers go
// nowhere: staging's clients already got theirs from staging, and mirrord discards these.
//
// Plain Node, no dependencies.
import { createServer } from 'node:http';

const port = Number(process.argv[2] ?? 8080);

// What is new compared with staging: an order is for 1 to 3 items (staging accepts any
// quantity), and an accepted order says when it will be ready. Mirroring shows at once how
// this meets real orders: staging's users do order 4 at a time.
const MAX_QUANTITY = 3;

const orders = [];
let handled = 0;

/** The status and JSON body this version answers a request with. */
function answer(method, path, body) {
  if (method === 'POST' && path === '/orders') {
    let order;
    try {
      order = JSON.parse(body || '{}');
    } catch {
      return [400, { error: 'the body is not JSON' }];
    }
    if (!(order.quantity >= 1 && order.quantity <= MAX_QUANTITY)) {
      return [422, { error: `quantity must be 1 to ${MAX_QUANTITY}` }];
    }
    orders.push(order);
    return [201, { id: orders.length, readyInMinutes: 2 + order.quantity }];
  }
  if (method === 'GET' && path === '/orders') return [200, { orders: orders.length }];
  return [404, { error: 'no such resource' }];
}

const server = createServer((request, response) => {
  let body = '';
  request.setEncoding('utf8');
  request.on('data', (chunk) => (body += chunk));
  request.on('end', () => {
    const path = new URL(request.url, 'http://localhost').pathname;
    const [status, reply] = answer(request.method, path, body);
    response.writeHead(status, { 'content-type': 'application/json' });
    response.end(JSON.stringify(reply));
    handled += 1;
    // The client's address is staging's client, not 127.0.0.1: mirrord's layer makes the
    // socket report the original peer.
    const { remoteAddress, remotePort } = request.socket;
    const shown = body ? `${request.url} ${body}` : request.url;
    console.log(
      `local app: ${request.method} ${shown} from ${remoteAddress}:${remotePort} -> ${status}`,
    );
  });
});

// Loopback only: nobody needs to reach this app over the network, mirrord replays staging's
// traffic into it from this machine.
server.listen(port, '127.0.0.1');

// mirrord ends the app with SIGTERM when the session ends; Ctrl-C in a terminal sends SIGINT.
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    console.log(`local app: handled ${handled} requests`);
    process.exit(0);
  });
}
