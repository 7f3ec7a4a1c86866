/**
 * Mirroring's CLI side (src/features/mirror/cli.ts) against an agent's session whose first
 * connection comes in the same read as the acknowledgement of its port: the session runs in
 * this process, so the two frames it writes in one turn of the event loop reach the client
 * together, as they do from a busy agent.
 */
import { once } from 'node:events';
import net from 'node:net';
import { MirroredTraffic, type MirrorEvent } from '../src/features/mirror/cli.js';
import { AgentClient } from '../src/protocol/client.js';
import { monotonicMicros } from '../src/protocol/clock.js';
import { AgentSession } from '../src/protocol/server.js';
import { waitFor } from './support/wait.js';

const SECRET = 'mirror-traffic-secret';
const REMOTE_PORT = 8080;
const BYTES = Buffer.from('GET / HTTP/1.1\r\nHost: staging\r\n\r\n');

test("a connection in the same read as its port's acknowledgement is replayed, after ready", async () => {
  // The app: a local listener that keeps what each connection sends.
  let received = Buffer.alloc(0);
  const app = net.createServer((socket) =>
    socket.on('data', (chunk: Buffer) => (received = Buffer.concat([received, chunk]))),
  );
  app.listen(0, '127.0.0.1');
  await once(app, 'listening');
  const appPort = (app.address() as net.AddressInfo).port;

  const agent = net.createServer((socket) => {
    void AgentSession.accept(socket, {
      agent: 'test',
      target: 'pid 1',
      interfaces: ['eth0'],
      secret: SECRET,
      capabilities: [],
    }).then((session) =>
      session.on('subscribe', (port) => {
        session.ackSubscribe(port);
        session.sendOpened({
          id: 1,
          family: 4,
          client: { address: '10.213.9.2', port: 40000 },
          server: { address: '10.213.9.1', port },
          interface: 'eth0',
          midStream: false,
        });
        session.sendData(1, BYTES, monotonicMicros());
        session.sendClosed(1, 'fin');
        session.flush();
      }),
    );
  });
  agent.listen(0, '127.0.0.1');
  await once(agent, 'listening');
  const socket = net.connect((agent.address() as net.AddressInfo).port, '127.0.0.1');
  await once(socket, 'connect');
  const client = await AgentClient.start(socket, { secret: SECRET });
  const events: MirrorEvent[] = [];
  let mirrored: MirroredTraffic | undefined;
  try {
    mirrored = await MirroredTraffic.start(client, 'pid 1', {
      ports: new Map([[REMOTE_PORT, appPort]]),
      ignorePorts: new Set(),
      midStream: false,
      log: () => undefined,
      emit: (event) => events.push(event),
    });
    await waitFor('the connection to be accounted', () =>
      events.some((event) => event.event === 'closed'),
    );
    expect(received.equals(BYTES)).toBe(true);
    const kinds = events.map((event) => event.event).filter((kind) => kind !== 'counters');
    expect(kinds).toEqual(['ready', 'opened', 'closed']);
    expect(events.find((event) => event.event === 'closed')).toMatchObject({
      bytesMirrored: BYTES.length,
      bytesReplayed: BYTES.length,
      bytesDropped: 0,
    });
  } finally {
    await mirrored?.close();
    await client.close();
    agent.close();
    app.close();
  }
});
