/**
 * The demo's "staging" service: a small HTTP API run inside the sandbox netns. Started as
 * `node service.js HOST PORT`.
 */
import { createServer } from 'node:http';

const [host = '0.0.0.0', port = '8080'] = process.argv.slice(2);
const orders: unknown[] = [];

createServer((request, response) => {
  const chunks: Buffer[] = [];
  request.on('data', (chunk: Buffer) => chunks.push(chunk));
  request.on('end', () => {
    if (request.method === 'POST' && request.url === '/orders') {
      orders.push(JSON.parse(Buffer.concat(chunks).toString() || '{}'));
      response.writeHead(201, { 'content-type': 'application/json' });
      response.end(JSON.stringify({ id: orders.length }));
      return;
    }
    response.writeHead(200, { 'content-type': 'application/json' });
    response.end(JSON.stringify({ orders: orders.length }));
  });
}).listen(Number(port), host);
