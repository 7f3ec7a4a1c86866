/* global process, Buffer */
// The destinations of `bench -- outgoing`, run in the target's peer netns (only the target
// reaches them). `node outgoing-servers.mjs ADDRESS BYTES`. Ports: 7101 echo once (answers the
// first chunk it reads and ends: the server closes first, so TIME_WAIT stays on this side and
// the target's ephemeral ports last through thousands of connects), 7102 sink (reads to the end,
// answers the count), 7103 source (sends BYTES from one reused buffer, then ends). Unlike the
// tests' servers, nothing is hashed or generated per byte: the baseline is the path, not this
// process. Prints "ready" once every one listens.
import net from 'node:net';

const [address = '0.0.0.0', sourceBytes = '0'] = process.argv.slice(2);
const CHUNK = Buffer.alloc(1024 * 1024, 0x5a);
const listen = (server, port) => new Promise((resolve) => server.listen(port, address, resolve));

const echoOnce = net.createServer((socket) => {
  socket.on('error', () => undefined);
  socket.once('data', (chunk) => socket.end(chunk));
});
const sink = net.createServer({ allowHalfOpen: true }, (socket) => {
  let count = 0;
  socket.on('data', (chunk) => (count += chunk.length));
  socket.on('end', () => socket.end(`${count}\n`));
  socket.on('error', () => undefined);
});
const source = net.createServer((socket) => {
  socket.on('error', () => undefined);
  let left = Number(sourceBytes);
  const pump = () => {
    while (left > 0) {
      const chunk = left >= CHUNK.length ? CHUNK : CHUNK.subarray(0, left);
      left -= chunk.length;
      if (!socket.write(chunk)) return void socket.once('drain', pump);
    }
    socket.end();
  };
  pump();
});

await Promise.all([listen(echoOnce, 7101), listen(sink, 7102), listen(source, 7103)]);
process.stdout.write('ready\n');
