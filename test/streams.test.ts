/**
 * Session streams (src/protocol/streams.ts) between two ends joined back to back, each end's
 * messages handed to the other's on the next turn of the event loop, as a session would: real
 * TCP sockets on loopback at both ends.
 */
import { createHash } from 'node:crypto';
import net from 'node:net';
import type { StreamMessage } from '../src/protocol/messages.js';
import { STREAM_WINDOW_BYTES, Streams, type StreamSession } from '../src/protocol/streams.js';
import { waitFor } from './support/wait.js';

/** A session whose messages reach `peer`; `behind` stands for its socket's backlog. */
class LoopSession implements StreamSession {
  peer!: Streams;
  behind = false;
  readonly #drained: (() => void)[] = [];
  sendStream(message: StreamMessage): void {
    const copy =
      message.type === 'streamData' ? { ...message, bytes: Buffer.from(message.bytes) } : message;
    setImmediate(() => this.peer.receive(copy));
  }
  get streamsBehind(): boolean {
    return this.behind;
  }
  onceDrained(listener: () => void): void {
    this.#drained.push(listener);
  }
  drain(): void {
    this.behind = false;
    for (const listener of this.#drained.splice(0)) listener();
  }
}

/** A connected pair of loopback TCP sockets: [the one that connected, the accepted one]. */
async function socketPair(server: net.Server): Promise<[net.Socket, net.Socket]> {
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await new Promise((resolve) => client.once('connect', resolve));
  const pair: [net.Socket, net.Socket] = [client, await accepted];
  // The ends are reset when a test is over; a test that expects an error listens for it.
  for (const socket of pair) socket.on('error', () => undefined);
  return pair;
}

describe('session streams', () => {
  let server: net.Server;
  const drops: number[] = [];
  let a: LoopSession;
  let b: LoopSession;
  let ends: [Streams, Streams];

  beforeEach(async () => {
    server = net.createServer({ allowHalfOpen: true });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    a = new LoopSession();
    b = new LoopSession();
    ends = [new Streams(a, (total) => drops.push(total)), new Streams(b, () => undefined)];
    a.peer = ends[1];
    b.peer = ends[0];
  });

  afterEach(() => {
    ends[0].resetAll();
    ends[1].resetAll();
    server.close();
  });

  test('a reader that does not read holds back its stream at the window, and loses nothing', async () => {
    // The app writes into end A; the far reader behind end B reads nothing for a while.
    const [app, appEnd] = await socketPair(server);
    const [farEnd, far] = await socketPair(server);
    far.pause();
    ends[0].joinSocket(1, appEnd);
    ends[1].joinSocket(1, farEnd);
    const bytes = 32 * 1024 * 1024;
    const sent = createHash('sha256');
    let written = 0;
    const writing = (async () => {
      for (let i = 0; written < bytes; i += 1) {
        const chunk = Buffer.alloc(64 * 1024, i & 0xff);
        sent.update(chunk);
        written += chunk.length;
        if (!app.write(chunk)) await new Promise((resolve) => app.once('drain', resolve));
      }
      app.end();
    })();
    // The writer stalls: end A stopped reading its socket, whose buffers then filled, before
    // the whole was written; what the far end holds unwritten is the window, not the whole.
    await waitFor(
      'the writer to stall',
      () => appEnd.isPaused() && app.writableNeedDrain && written < bytes,
    );
    // The sender stops once a window is uncredited: the read that crossed it is the most past it.
    expect(farEnd.writableLength).toBeLessThanOrEqual(STREAM_WINDOW_BYTES + 64 * 1024);
    const received = createHash('sha256');
    let count = 0;
    far.on('data', (chunk: Buffer) => {
      received.update(chunk);
      count += chunk.length;
    });
    const ended = new Promise((resolve) => far.once('end', resolve));
    far.resume();
    await writing;
    await ended;
    expect({ count, sha256: received.digest('hex') }).toEqual({
      count: bytes,
      sha256: sent.digest('hex'),
    });
  }, 60_000);

  test('half-close travels both ways, and a reset is the peer’s ECONNRESET', async () => {
    const [app, appEnd] = await socketPair(server);
    const [farEnd, far] = await socketPair(server);
    ends[0].joinSocket(2, appEnd);
    ends[1].joinSocket(2, farEnd);
    app.end('question');
    const question: Buffer[] = [];
    far.on('data', (chunk: Buffer) => question.push(chunk));
    await new Promise((resolve) => far.once('end', resolve));
    far.end('answer after your end');
    const answer: Buffer[] = [];
    app.on('data', (chunk: Buffer) => answer.push(chunk));
    await new Promise((resolve) => app.once('end', resolve));
    expect([Buffer.concat(question).toString(), Buffer.concat(answer).toString()]).toEqual([
      'question',
      'answer after your end',
    ]);

    const [app2, appEnd2] = await socketPair(server);
    const [farEnd2, far2] = await socketPair(server);
    ends[0].joinSocket(3, appEnd2);
    ends[1].joinSocket(3, farEnd2);
    const failed = new Promise<string | undefined>((resolve) =>
      app2.once('error', (error: NodeJS.ErrnoException) => resolve(error.code)),
    );
    far2.resetAndDestroy();
    expect(await failed).toBe('ECONNRESET');
  });

  test('datagrams meeting a session that is behind are dropped and told', async () => {
    const delivered: string[] = [];
    ends[0].joinDatagrams(
      4,
      () => undefined,
      () => undefined,
    );
    ends[1].joinDatagrams(
      4,
      (bytes) => delivered.push(bytes.toString()),
      () => undefined,
    );
    expect(ends[0].sendDatagram(4, Buffer.from('one'))).toBe(true);
    a.behind = true;
    expect(ends[0].sendDatagram(4, Buffer.from('two'))).toBe(false);
    expect(ends[0].sendDatagram(4, Buffer.from('three'))).toBe(false);
    a.drain();
    expect(ends[0].sendDatagram(4, Buffer.from('four'))).toBe(true);
    await waitFor('the drops to be told', () => drops.length > 0);
    expect(drops).toEqual([2]);
    expect(delivered).toEqual(['one', 'four']);
  });
});
