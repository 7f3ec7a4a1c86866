/**
 * A session's feature requests yield to mirroring (src/features/host.ts): against a client that
 * does not read, a burst of large replies never piles up in the agent's socket, and once the
 * client reads, every reply arrives, in full.
 */
import { once } from 'node:events';
import net from 'node:net';
import type { AgentFeature } from '../src/features/agent.js';
import { FeatureHost } from '../src/features/host.js';
import { FrameDecoder, encodeFrame } from '../src/protocol/framing.js';
import {
  PROTOCOL_VERSION,
  clientMessageToWire,
  parseAgentMessage,
  type AgentMessage,
  type ReplyMessage,
  type WireValue,
} from '../src/protocol/messages.js';
import { AgentSession } from '../src/protocol/server.js';
import { waitFor } from './support/wait.js';

const SECRET = 'feature-host-secret';
const REPLY_BYTES = 1024 * 1024;
const REQUESTS = 64;

test('a burst of 1 MiB replies waits for the socket, then all arrive', async () => {
  let served = 0;
  const features = new Map<string, AgentFeature>([
    [
      'bulk',
      { serve: async (body) => (served++, [body, Buffer.alloc(REPLY_BYTES, Number(body))]) },
    ],
  ]);
  let session: AgentSession | undefined;
  const server = net.createServer((socket) => {
    void AgentSession.accept(socket, {
      agent: 'test',
      target: 'pid 1',
      interfaces: [],
      secret: SECRET,
      capabilities: ['bulk'],
    }).then((accepted) => {
      session = accepted;
      const host = new FeatureHost(features, accepted);
      accepted.on('request', (id, feature, body) => host.request(id, feature, body));
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  try {
    await once(client, 'connect');
    client.write(
      encodeFrame([
        clientMessageToWire({
          type: 'hello',
          version: PROTOCOL_VERSION,
          capabilities: [],
          client: 'test',
          secret: SECRET,
        }),
        ...Array.from({ length: REQUESTS }, (_, i) =>
          clientMessageToWire({ type: 'request', id: i + 1, feature: 'bulk', body: i % 250 }),
        ),
      ]),
    );
    // The client reads nothing yet: the agent's socket fills, and the replies wait.
    client.pause();
    await waitFor('the first replies to be served', () => served >= 8);
    let highest = 0;
    const watch = setInterval(() => (highest = Math.max(highest, session?.backlogBytes ?? 0)), 5);
    // Replies stop at the host's threshold: the ones served since wait for 'drain'.
    await waitFor(
      'the replies to wait for the socket',
      () => (session?.backlogBytes ?? 0) >= 512 * 1024,
    );
    // Under the threshold, plus the one reply written when it was crossed.
    expect(highest).toBeLessThan(512 * 1024 + REPLY_BYTES + 1024);
    expect(served).toBeLessThan(REQUESTS);

    const decoder = new FrameDecoder<AgentMessage>(parseAgentMessage);
    const replies: ReplyMessage[] = [];
    client.on('data', (chunk: Buffer) => {
      for (const message of decoder.push(chunk)) {
        if (message.type === 'reply') replies.push({ ...message, body: copy(message.body) });
      }
    });
    client.resume();
    await waitFor('every reply', () => replies.length === REQUESTS, { ms: 30_000 });
    clearInterval(watch);
    expect(highest).toBeLessThan(512 * 1024 + REPLY_BYTES + 1024);
    for (const reply of replies) {
      const [tag, bytes] = reply.body as [number, Buffer];
      expect(reply.error).toBeNull();
      expect(tag).toBe((reply.id - 1) % 250);
      expect(bytes.length).toBe(REPLY_BYTES);
      expect(bytes.every((byte) => byte === tag)).toBe(true);
    }
  } finally {
    client.destroy();
    session?.close();
    server.close();
  }
}, 60_000);

/** A reply's bytes outlive the chunk they were decoded from. */
function copy(body: WireValue): WireValue {
  if (Array.isArray(body)) return body.map(copy);
  return body instanceof Uint8Array ? Buffer.from(body) : body;
}
