import { once } from 'node:events';
import net from 'node:net';
import { AgentClock, monotonicMicros } from '../src/protocol/clock.js';
import { AgentClient, AgentClientError, connectToAgent } from '../src/protocol/client.js';
import {
  FrameDecoder,
  FrameEncoder,
  MAX_FRAME_SIZE,
  MAX_MESSAGES_PER_FRAME,
  encodeFrame,
} from '../src/protocol/framing.js';
import { FrameMemory } from '../src/protocol/frame-memory.js';
import {
  PROTOCOL_VERSION,
  ProtocolError,
  agentMessageToWire,
  clientMessageToWire,
  parseAgentMessage,
  parseClientMessage,
  type AgentHelloMessage,
  type AgentMessage,
  type ClientMessage,
  type CountersMessage,
  type DataMessage,
  type WireMessage,
} from '../src/protocol/messages.js';
import {
  AgentSession,
  AgentSessionError,
  type AgentSessionOptions,
} from '../src/protocol/server.js';
import { prng } from './support/prng.js';
import { waitFor } from './support/wait.js';

// ---- helpers ----

function randomBytes(random: () => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = Math.floor(random() * 256);
  return b;
}

const agentDecoder = (limits = {}): FrameDecoder<AgentMessage> =>
  new FrameDecoder(parseAgentMessage, limits);
const clientDecoder = (limits = {}): FrameDecoder<ClientMessage> =>
  new FrameDecoder(parseClientMessage, limits);

/**
 * Payloads as hex: jest's toEqual walks a Buffer element by element, which makes comparing
 * thousands of decodes of a 70 kB payload take minutes.
 */
function hexed(messages: readonly unknown[]): unknown[] {
  return messages.map((m) =>
    (m as AgentMessage).type === 'data'
      ? { ...(m as DataMessage), bytes: (m as DataMessage).bytes.toString('hex') }
      : m,
  );
}

function withoutType<T extends { type: string }>(message: T): Omit<T, 'type'> {
  const copy: Partial<T> = { ...message };
  delete copy.type;
  return copy as Omit<T, 'type'>;
}

/** A frame whose body is the given raw msgpack bytes. */
function rawFrame(body: Buffer): Buffer {
  const header = Buffer.alloc(4);
  header.writeUInt32BE(body.length);
  return Buffer.concat([header, body]);
}

/** A frame of hand-made wire messages (wrong types included), encoded by msgpackr. */
function wireFrame(...messages: unknown[][]): Buffer {
  return encodeFrame(messages as WireMessage[]);
}

function decodeError(decoder: FrameDecoder<unknown>, ...chunks: Buffer[]): ProtocolError {
  try {
    for (const chunk of chunks) decoder.push(chunk);
  } catch (error) {
    expect(error).toBeInstanceOf(ProtocolError);
    return error as ProtocolError;
  }
  throw new Error('expected a ProtocolError');
}

/** Feeds chunks; returns the messages, or the error, which must be a ProtocolError. */
function decodeLoosely(
  decoder: FrameDecoder<unknown>,
  chunks: Buffer[],
): unknown[] | ProtocolError {
  const out: unknown[] = [];
  try {
    for (const chunk of chunks) out.push(...decoder.push(chunk));
    return out;
  } catch (error) {
    if (!(error instanceof ProtocolError)) throw error;
    return error;
  }
}

const clientSamples: ClientMessage[] = [
  {
    type: 'hello',
    version: PROTOCOL_VERSION,
    capabilities: ['ipv6', 'mid-stream'],
    client: 'cli é',
    secret: 'sécret',
  },
  { type: 'subscribe', port: 8080 },
  { type: 'unsubscribe', port: 65535 },
  { type: 'ping', nonce: 2 ** 40 },
  { type: 'bye' },
  { type: 'request', id: 1, feature: 'env', body: null },
  { type: 'request', id: 2 ** 40, feature: 'files', body: ['open', '/etc/é', [1, true, -2.5]] },
];

const agentSamples: AgentMessage[] = [
  {
    type: 'hello',
    version: PROTOCOL_VERSION,
    capabilities: ['ipv6'],
    agent: 'mirrord-agent test',
    target: 'pid 42',
    interfaces: ['eth0', 'lo'],
    clockMicros: 86_400_000_000 * 400,
  },
  { type: 'refused', version: 7, reason: 'too old' },
  { type: 'subscribed', port: 1 },
  { type: 'subscribeFailed', port: 443, reason: 'map full' },
  { type: 'unsubscribed', port: 443 },
  {
    type: 'opened',
    id: 0,
    family: 4,
    client: { address: '10.213.0.7', port: 51234 },
    server: { address: '10.213.0.2', port: 8080 },
    interface: 'eth0',
    midStream: false,
  },
  {
    type: 'opened',
    id: 2 ** 33,
    family: 6,
    client: { address: 'fd00::7', port: 1 },
    server: { address: '::1', port: 65535 },
    interface: 'lo',
    midStream: true,
  },
  { type: 'data', id: 0, bytes: Buffer.from('GET / HTTP/1.1\r\n\r\n'), tapMicros: 7 },
  { type: 'data', id: 2 ** 33, bytes: Buffer.alloc(0), tapMicros: 7 },
  { type: 'data', id: 1, bytes: randomBytes(prng(1), 70_000), tapMicros: 7 },
  { type: 'closed', id: 0, reason: 'fin', gapBytes: 0 },
  { type: 'closed', id: 1, reason: 'rst', gapBytes: 0 },
  { type: 'closed', id: 2, reason: 'expired', gapBytes: 0 },
  { type: 'closed', id: 3, reason: 'broken', gapBytes: 1460 },
  {
    type: 'counters',
    segmentsCopied: 1,
    bytesCopied: 2 ** 45,
    segmentsDroppedKernel: 3,
    bytesDroppedKernel: 2 ** 32,
    connectionsDroppedAgent: 0,
    bytesDroppedAgent: 255,
    connectionsOpen: 65536,
    bytesMirrored: 2 ** 44,
    bytesIgnored: 7,
    bytesInAgent: 0,
  },
  { type: 'error', code: 'tap', message: 'interface lo went away', fatal: false },
  { type: 'error', code: 'target-gone', message: 'the target exited', fatal: true },
  { type: 'pong', nonce: 0, clockMicros: 2 ** 45 },
  {
    type: 'reply',
    id: 1,
    error: null,
    body: [
      ['A', '1'],
      ['B', 'é='],
    ],
  },
  { type: 'reply', id: 2, error: 'no such file', body: null },
];

/** The agent samples as a stream of several frames of different sizes. */
function agentStream(samples: AgentMessage[] = agentSamples): Buffer {
  const encoder = new FrameEncoder(agentMessageToWire, { maxMessagesPerFrame: 3 });
  for (const m of samples) encoder.push(m);
  return Buffer.concat(encoder.takeFrames());
}

// ---- messages and framing ----

describe('round trip', () => {
  test('every client message', () => {
    const encoder = new FrameEncoder(clientMessageToWire);
    for (const m of clientSamples) encoder.push(m);
    const frames = encoder.takeFrames();
    expect(frames).toHaveLength(1);
    expect(clientDecoder().push(frames[0] as Buffer)).toEqual(clientSamples);
  });

  test('every agent message, data as Buffer', () => {
    const decoded = agentDecoder().push(agentStream());
    expect(hexed(decoded)).toEqual(hexed(agentSamples));
    for (const m of decoded) {
      if (m.type === 'data') expect(Buffer.isBuffer(m.bytes)).toBe(true);
    }
  });

  test('payloads travel as msgpack bin and decode as views of the frame', () => {
    const frame = encodeFrame([
      agentMessageToWire({ type: 'data', id: 5, bytes: Buffer.from('xyz'), tapMicros: 7 }),
    ]);
    // [ [0x16, 5, bin8(3) 'xyz', 7] ]
    expect(frame.subarray(4).toString('hex')).toBe('9194' + '16' + '05' + 'c403' + '78797a' + '07');
    const [message] = agentDecoder().push(frame) as [DataMessage];
    expect(message.bytes.buffer).toBe(frame.buffer);
  });

  test('hello tolerates trailing fields a newer peer may add', () => {
    const frame = wireFrame([0x01, 2, ['x'], 'future-cli', 'extra', 42]);
    expect(clientDecoder().push(frame)).toEqual([
      { type: 'hello', version: 2, capabilities: ['x'], client: 'future-cli', secret: 'extra' },
    ]);
    // An older client's hello has no secret: read as empty, and refused for its version.
    expect(clientDecoder().push(wireFrame([0x01, 3, [], 'old-cli']))).toEqual([
      { type: 'hello', version: 3, capabilities: [], client: 'old-cli', secret: '' },
    ]);
  });
});

describe('incremental decoding', () => {
  test('a split at every byte position gives the same messages', () => {
    const stream = agentStream();
    const small = agentStream(
      agentSamples.filter((m) => m.type !== 'data' || m.bytes.length < 100),
    );
    for (const s of [small, stream]) {
      const expected = hexed(agentDecoder().push(s));
      const step = s === stream ? 97 : 1; // the stream with 70 kB of payload: sample positions
      for (let i = 0; i <= s.length; i += step) {
        const decoder = agentDecoder();
        const out = [...decoder.push(s.subarray(0, i)), ...decoder.push(s.subarray(i))];
        expect(hexed(out)).toEqual(expected);
        expect(decoder.bufferedBytes).toBe(0);
      }
    }
    expect(hexed(agentDecoder().push(stream))).toEqual(hexed(agentSamples));
  });

  test('byte by byte, and in random chunkings', () => {
    const stream = agentStream();
    const expected = hexed(agentSamples);
    const decoder = agentDecoder();
    const out: AgentMessage[] = [];
    for (let i = 0; i < stream.length; i++) out.push(...decoder.push(stream.subarray(i, i + 1)));
    expect(hexed(out)).toEqual(expected);

    const random = prng(7);
    for (let round = 0; round < 200; round++) {
      const d = agentDecoder();
      const got: AgentMessage[] = [];
      for (let at = 0; at < stream.length;) {
        const n = 1 + Math.floor(random() * (random() < 0.5 ? 16 : 40_000));
        got.push(...d.push(stream.subarray(at, at + n)));
        at += n;
      }
      expect(hexed(got)).toEqual(expected);
    }
  });

  test('frames are cut to the limits by the encoder', () => {
    const encoder = new FrameEncoder(clientMessageToWire);
    for (let i = 0; i < MAX_MESSAGES_PER_FRAME * 2 + 1; i++)
      encoder.push({ type: 'ping', nonce: i });
    expect(encoder.pendingMessages).toBe(1);
    const frames = encoder.takeFrames();
    expect(frames).toHaveLength(3);
    const decoder = clientDecoder();
    expect(frames.flatMap((f) => decoder.push(f))).toHaveLength(MAX_MESSAGES_PER_FRAME * 2 + 1);

    const small = new FrameEncoder(agentMessageToWire, { maxFrameSize: 64 * 1024 });
    for (let i = 0; i < 10; i++)
      small.push({ type: 'data', id: i, bytes: Buffer.alloc(20_000), tapMicros: 7 });
    const cut = small.takeFrames();
    expect(cut.length).toBeGreaterThanOrEqual(4);
    for (const f of cut) expect(f.length - 4).toBeLessThanOrEqual(64 * 1024);
    expect(() =>
      small.push({ type: 'data', id: 0, bytes: Buffer.alloc(64 * 1024), tapMicros: 7 }),
    ).toThrow(RangeError);
  });

  test('frameBytes seals a frame before it passes the size, unless one message alone does', () => {
    const encoder = new FrameEncoder(agentMessageToWire, { frameBytes: 50_000 });
    for (let i = 0; i < 10; i++)
      encoder.push({ type: 'data', id: i, bytes: Buffer.alloc(20_000, i), tapMicros: 7 });
    encoder.push({ type: 'data', id: 10, bytes: Buffer.alloc(70_000, 10), tapMicros: 7 });
    const frames = encoder.takeFrames();
    // Two 20 kB messages per frame, then the 70 kB message alone.
    expect(frames.map((f) => agentDecoder().push(f).length)).toEqual([2, 2, 2, 2, 2, 1]);
    for (const f of frames.slice(0, -1)) expect(f.length).toBeLessThanOrEqual(50_000);
    const ids = frames.flatMap((f) =>
      agentDecoder()
        .push(f)
        .map((m) => (m as DataMessage).id),
    );
    expect(ids).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  });
});

describe('frame memory', () => {
  const dataFrame = (memory: FrameMemory, id: number, bytes: Buffer): Buffer => {
    const wire = agentMessageToWire({ type: 'data', id, bytes, tapMicros: 7 });
    return encodeFrame([wire], memory, bytes.length + 64);
  };

  test('a frame keeps its bytes until written; written memory is cut again', () => {
    const memory = new FrameMemory();
    const random = prng(3);
    const held: { frame: Buffer; bytes: Buffer }[] = [];
    // 4 MiB of frames held at once (as a socket that does not take them would), then written.
    for (let i = 0; i < 64; i++) {
      const bytes = randomBytes(random, 60_000 + i);
      held.push({ frame: dataFrame(memory, i, bytes), bytes });
    }
    for (const [i, { frame, bytes }] of held.entries()) {
      const [message] = agentDecoder().push(frame) as [DataMessage];
      expect(message.id).toBe(i);
      expect(message.bytes.equals(bytes)).toBe(true);
    }
    const slabs = new Set(held.map(({ frame }) => frame.buffer));
    expect(slabs.size).toBeGreaterThan(8);
    for (const { frame } of held) memory.written(frame);
    // A few slabs stay for the next burst; the others are left to the GC.
    expect(memory.allocatedBytes).toBeLessThanOrEqual(5 * 256 * 1024);

    // Written at once, as a socket that keeps up: the same memory over and over.
    const reused = new Set<ArrayBufferLike>();
    for (let i = 0; i < 1000; i++) {
      const frame = dataFrame(memory, i, Buffer.alloc(60_000, i));
      reused.add(frame.buffer);
      memory.written(frame);
    }
    expect(reused.size).toBe(1);
    expect(slabs.has([...reused][0]!)).toBe(true);
  });

  test('a frame too large for a slab gets a slab of its own, used again once written', () => {
    const memory = new FrameMemory();
    // A file's MiB pieces, written as they are encoded: one slab for them all.
    const large = new Set<ArrayBufferLike>();
    for (let i = 0; i < 20; i++) {
      const bytes = Buffer.alloc(1024 * 1024 - i, i);
      const frame = dataFrame(memory, i, bytes);
      expect((agentDecoder().push(frame)[0] as DataMessage).bytes.equals(bytes)).toBe(true);
      large.add(frame.buffer);
      memory.written(frame);
    }
    expect(large.size).toBe(1);
    // Held at once, each has its own; written, a few stay for the next burst.
    const held = Array.from({ length: 8 }, (_, i) =>
      dataFrame(memory, i, Buffer.alloc(300_000, i)),
    );
    expect(new Set(held.map((frame) => frame.buffer)).size).toBe(8);
    for (const frame of held) memory.written(frame);
    expect(memory.allocatedBytes).toBeLessThanOrEqual(4 * 1024 * 1024 + 4 * 512 * 1024);
    const frame = dataFrame(memory, 1, Buffer.alloc(200_000, 1));
    memory.written(frame);
    // msgpackr's own buffer is not frame memory: the next frame outside the pool does not
    // land in the slab that the last pooled frame came from.
    const pooled = dataFrame(memory, 2, Buffer.alloc(1000, 2));
    const outside = encodeFrame([agentMessageToWire(agentSamples[14] as AgentMessage)]);
    expect(outside.buffer).not.toBe(pooled.buffer);
    memory.written(pooled);
    const next = dataFrame(memory, 3, Buffer.alloc(1000, 3));
    expect(hexed(agentDecoder().push(outside))).toEqual(hexed([agentSamples[14]]));
    expect((agentDecoder().push(next)[0] as DataMessage).bytes.equals(Buffer.alloc(1000, 3))).toBe(
      true,
    );
  });
});

describe('hostile input', () => {
  test('a huge declared length fails at once, without buffering', () => {
    const decoder = agentDecoder();
    const error = decodeError(decoder, Buffer.from([0xff, 0xff]), Buffer.from([0xff, 0xff, 1, 2]));
    expect(error.message).toMatch(/4294967295 bytes exceeds the limit of 16777216/);
    expect(decoder.bufferedBytes).toBe(0);

    const over = Buffer.alloc(4);
    over.writeUInt32BE(MAX_FRAME_SIZE + 1);
    expect(decodeError(agentDecoder(), over).message).toMatch(/exceeds the limit/);
    expect(decodeError(agentDecoder(), Buffer.alloc(4)).message).toMatch(/empty frame/);
  });

  test('never holds more than one frame', () => {
    const decoder = agentDecoder({ maxFrameSize: 1000 });
    const header = Buffer.alloc(4);
    header.writeUInt32BE(1000);
    decoder.push(header);
    for (let i = 0; i < 999; i++) decoder.push(Buffer.from([0x91]));
    expect(decoder.bufferedBytes).toBe(999);
    // The last byte completes the frame, which is then rejected (nested too deep).
    expect(decodeError(decoder, Buffer.from([0xc0])).message).toMatch(/deeper/);
    expect(decoder.bufferedBytes).toBe(0);
  });

  test('random garbage gives messages or a ProtocolError, nothing else', () => {
    const random = prng(42);
    let errors = 0;
    for (let i = 0; i < 3000; i++) {
      const garbage = randomBytes(random, Math.floor(random() * 400));
      if (i % 2 === 0 && garbage.length >= 4) garbage.writeUInt32BE(garbage.length - 4);
      const result = decodeLoosely(i % 3 ? agentDecoder() : clientDecoder(), [garbage]);
      if (result instanceof ProtocolError) errors++;
    }
    expect(errors).toBeGreaterThan(1000);
  });

  test('mutated valid frames give valid messages or a ProtocolError', () => {
    const stream = agentStream(
      agentSamples.filter((m) => m.type !== 'data' || m.bytes.length < 100),
    );
    const random = prng(3);
    for (let i = 0; i < 5000; i++) {
      const mutated = Buffer.from(stream);
      for (let k = 1 + Math.floor(random() * 3); k > 0; k--) {
        mutated[Math.floor(random() * mutated.length)] = Math.floor(random() * 256);
      }
      const cut = Math.floor(random() * mutated.length);
      const result = decodeLoosely(agentDecoder(), [
        mutated.subarray(0, cut),
        mutated.subarray(cut),
      ]);
      if (!(result instanceof ProtocolError)) {
        // Whatever got through was validated: re-encoding it must work.
        for (const m of result) agentMessageToWire(m as AgentMessage);
      }
    }
  });

  test('malformed bodies', () => {
    const cases: [Buffer, RegExp][] = [
      [rawFrame(Buffer.from([0x93, 0x01, 0x02])), /truncated/],
      [rawFrame(Buffer.from([0x01])), /not an array of messages/],
      [rawFrame(Buffer.from([0xa3, 0x61, 0x62, 0x63])), /not an array of messages/],
      [rawFrame(Buffer.from([0x92, 0x91, 0x12, 0x05])), /message 1 is not an array/],
      [rawFrame(Buffer.from([0x91, 0x91, 0x12, 0xc0])), /bytes after the array/],
      [rawFrame(Buffer.from([0x91, 0x92, 0xc1, 0x00])), /0xc1/],
      [rawFrame(Buffer.from([0x91, 0x81, 0xa1, 0x61, 0x01])), /maps are not used/],
      [rawFrame(Buffer.from([0x91, 0x92, 0x16, 0xd6, 0xff, 0, 0, 0, 0])), /extension 0xd6/],
      [rawFrame(Buffer.from([0x91, 0x92, 0x16, 0xd4, 0x72, 0x40])), /extension 0xd4/],
      [rawFrame(Buffer.from([0x91, 0x92, 0x16, 0xc7, 0x01, 0x05, 0x00])), /extension 0xc7/],
      [rawFrame(Buffer.from([0x91, 0x92, 0x16, 0xc6, 0xff, 0xff, 0xff, 0xff])), /truncated/],
      [rawFrame(Buffer.from([0x91, 0x92, 0x16, 0xdd, 0xff, 0xff, 0xff, 0xff])), /list items/],
      [rawFrame(Buffer.from([0x91, 0xdc, 0x00, 0x11, ...Array<number>(17).fill(0)])), /17 fields/],
    ];
    for (const [frame, pattern] of cases) {
      expect(decodeError(agentDecoder(), frame).message).toMatch(pattern);
    }
    expect(agentDecoder().push(rawFrame(Buffer.from([0x90])))).toEqual([]);
  });

  test('wrong message shapes', () => {
    const agentCases: [unknown[], RegExp][] = [
      [[0x7f], /unknown message type code 127 from the agent/],
      [[0x02, 80], /subscribe \(code 2\) is not sent by the agent/],
      [['data', 1, Buffer.alloc(1)], /type code: expected an integer, got string/],
      [[], /expected a message/],
      [[0x16, -1, Buffer.alloc(1), 0], /data\.id: expected a non-negative integer, got number -1/],
      [[0x16, 1.5, Buffer.alloc(1), 0], /data\.id/],
      [[0x16, 1, 'abc', 0], /data\.bytes: expected binary, got string "abc"/],
      [[0x16, 1, [1, 2, 3], 0], /data\.bytes: expected binary, got array/],
      [[0x16, 1, Buffer.alloc(1), -3], /data\.tapMicros: expected a non-negative integer/],
      [[0x16, 1], /data: expected 3 fields, got 1/],
      [[0x16, 1, Buffer.alloc(1), 0, 0], /data: expected 3 fields, got 4/],
      [[0x12, '80'], /subscribed\.port: expected a port number/],
      [[0x12, 0], /subscribed\.port/],
      [[0x12, 65536], /subscribed\.port/],
      [[0x15, 1, 5, '1.2.3.4', 1, '1.2.3.4', 2, 'eth0', false], /opened\.family: expected 4 or 6/],
      [[0x15, 1, 4, '::1', 1, '1.2.3.4', 2, 'eth0', false], /client\.address: expected an IPv4/],
      [[0x15, 1, 6, '::1', 1, '::2', 2, 'eth0', 0], /midStream: expected a boolean/],
      [[0x17, 1, 'bogus', 0], /closed\.reason: expected fin\|rst\|expired\|broken/],
      [[0x18, 1, 2, 3, 4, 5, 6, 0.5, 8, 9, 10], /counters\.connectionsOpen/],
      [[0x18, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1], /counters\.bytesInAgent/],
      [[0x18, 1, 2, 3, 4, 5, 6, 7], /counters: expected 10 fields, got 7/],
      [[0x19, 'x', 'y', 'true'], /error\.fatal: expected a boolean/],
      [[0x10, 1, 'ipv6', 'a', 't', [], 0], /hello\.capabilities: expected an array of strings/],
      [[0x10, 1, [1], 'a', 't', [], 0], /hello\.capabilities/],
      [[0x10, 1, [], 'a', 't', []], /hello: expected at least 6 fields, got 5/],
      [[0x1a, null, 0], /pong\.nonce: expected a non-negative integer, got nil/],
      [[0x1a, 1], /pong: expected 2 fields, got 1/],
    ];
    for (const [wire, pattern] of agentCases) {
      expect(decodeError(agentDecoder(), wireFrame(wire)).message).toMatch(pattern);
    }
    expect(decodeError(clientDecoder(), wireFrame([0x16, 1, Buffer.alloc(1)])).message).toMatch(
      /data \(code 22\) is not sent by the client/,
    );
    expect(decodeError(clientDecoder(), wireFrame([0x02, '80'])).message).toMatch(
      /subscribe\.port/,
    );
    // A uint64 beyond 2^53 (as another msgpack implementation would send) is not an integer here.
    const bigNonce = rawFrame(Buffer.from([0x91, 0x92, 0x04, 0xcf, 0xff, 0, 0, 0, 0, 0, 0, 1]));
    expect(decodeError(clientDecoder(), bigNonce).message).toMatch(/ping\.nonce/);
  });

  test('deeply nested msgpack is rejected before msgpackr recurses', () => {
    const depth = 1_000_000;
    const arrays = Buffer.alloc(depth + 1, 0x91);
    arrays[depth] = 0xc0;
    expect(decodeError(agentDecoder(), rawFrame(arrays)).message).toMatch(/nested deeper than 8/);
    // { "": { "": … } } inside a message
    const maps = Buffer.alloc(2 + depth * 2 + 1, 0xa0);
    maps.set([0x91, 0x91]);
    for (let i = 0; i < depth; i++) maps[2 + 2 * i] = 0x81;
    maps[maps.length - 1] = 0xc0;
    expect(decodeError(agentDecoder(), rawFrame(maps)).message).toMatch(/maps are not used/);
  });

  test('10 million tiny messages: bounded work', () => {
    const count = 10_000_000;
    const body = Buffer.alloc(5 + count, 0x05);
    body[0] = 0xdd;
    body.writeUInt32BE(count, 1);
    const timed = (f: () => void): string => {
      const started = performance.now();
      f();
      return `${(performance.now() - started).toFixed(1)} ms`;
    };
    const byCount = timed(() =>
      expect(decodeError(agentDecoder(), rawFrame(body)).message).toMatch(
        /10000000 messages in a frame, the limit is 16384/,
      ),
    );
    // Even with the message limit lifted, the first non-array message stops the scan…
    const unlimited = { maxMessagesPerFrame: count };
    const byShape = timed(() =>
      expect(decodeError(agentDecoder(unlimited), rawFrame(body)).message).toMatch(
        /message 0 is not an array/,
      ),
    );
    // …and 8 million well-formed one-field messages stop at the value budget, before msgpackr
    // builds anything.
    const many = 8_000_000;
    const valid = Buffer.alloc(5 + 2 * many, 0x05);
    valid[0] = 0xdd;
    valid.writeUInt32BE(many, 1);
    for (let i = 5; i < valid.length; i += 2) valid[i] = 0x91;
    expect(valid.length).toBeLessThanOrEqual(MAX_FRAME_SIZE);
    const byBudget = timed(() =>
      expect(decodeError(agentDecoder(unlimited), rawFrame(valid)).message).toMatch(
        /more than 262144 values/,
      ),
    );
    console.log(
      `10M-message frame rejected in ${byCount} (count), ${byShape} (shape); ` +
        `8M valid messages rejected in ${byBudget} (value budget)`,
    );
  });

  test('a failed decoder stays failed', () => {
    const decoder = agentDecoder();
    const first = decodeError(decoder, rawFrame(Buffer.from([0x01])));
    expect(() => decoder.push(agentStream())).toThrow(first);
  });
});

test('throughput of data messages through encoder and decoder (sanity, reported)', () => {
  const results: string[] = [];
  for (const size of [1460, 16 * 1024, 64 * 1024]) {
    const payload = randomBytes(prng(size), size);
    const encoder = new FrameEncoder(agentMessageToWire);
    const decoder = agentDecoder();
    let bytes = 0;
    const started = performance.now();
    while (performance.now() - started < 500) {
      // One batch ≈ what the agent flushes per tap batch (~256 KiB).
      for (let i = 0; i < (256 * 1024) / size; i++)
        encoder.push({ type: 'data', id: i, bytes: payload, tapMicros: 7 });
      for (const frame of encoder.takeFrames()) {
        for (const m of decoder.push(frame)) bytes += (m as DataMessage).bytes.length;
      }
    }
    const mbps = bytes / 1e6 / ((performance.now() - started) / 1000);
    results.push(`${size} B payloads: ${mbps.toFixed(0)} MB/s`);
  }
  console.log(`encode+decode throughput: ${results.join(', ')}`);
});

// ---- sessions over TCP ----

/** The secret the test agents are started with, which the test clients present. */
const SECRET = 'test-secret';

const sessionOptions: AgentSessionOptions = {
  agent: 'test-agent',
  target: 'pid 1',
  interfaces: ['eth0', 'lo'],
  secret: SECRET,
};

interface TestAgent {
  port: number;
  sessions: AgentSession[];
  failures: Error[];
  nextSession(): Promise<AgentSession>;
  close(): Promise<void>;
}

/** A TCP server running AgentSession on each connection. */
async function startAgent(options: Partial<AgentSessionOptions> = {}): Promise<TestAgent> {
  const sessions: AgentSession[] = [];
  const failures: Error[] = [];
  const waiting: ((s: AgentSession) => void)[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    AgentSession.accept(socket, { ...sessionOptions, ...options }).then(
      (session) => {
        sessions.push(session);
        waiting.shift()?.(session);
      },
      (error: Error) => failures.push(error),
    );
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as net.AddressInfo).port,
    sessions,
    failures,
    nextSession: () => new Promise((resolve) => waiting.push(resolve)),
    close: async () => {
      for (const s of sockets) s.destroy();
      server.close();
      await once(server, 'close');
    },
  };
}

/** A TCP server whose connections are handled by hand (a fake or broken agent). */
async function startRaw(
  onSocket: (socket: net.Socket) => void,
): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
    onSocket(socket);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    port: (server.address() as net.AddressInfo).port,
    close: async () => {
      for (const s of sockets) s.destroy();
      server.close();
      await once(server, 'close');
    },
  };
}

/** A raw socket to `port` that records everything it receives. */
async function rawClient(port: number): Promise<{ socket: net.Socket; received: Promise<Buffer> }> {
  const socket = net.connect(port, '127.0.0.1');
  socket.on('error', () => {});
  await once(socket, 'connect');
  const chunks: Buffer[] = [];
  socket.on('data', (c: Buffer) => chunks.push(c));
  const received = once(socket, 'close').then(() => Buffer.concat(chunks));
  return { socket, received };
}

const clientHello = (version = PROTOCOL_VERSION, secret = SECRET): Buffer =>
  encodeFrame([
    clientMessageToWire({ type: 'hello', version, capabilities: [], client: 'raw', secret }),
  ]);

const agentHelloFrame = encodeFrame([agentMessageToWire(agentSamples[0] as AgentMessage)]);

async function until(condition: () => boolean, timeoutMs = 5000): Promise<void> {
  await waitFor('a condition', condition, { ms: timeoutMs, everyMs: 5 });
}

describe('sessions', () => {
  test('handshake, subscribe, mirrored connection, counters, close', async () => {
    const agent = await startAgent();
    try {
      const sessionReady = agent.nextSession();
      const client = await connectToAgent('127.0.0.1', agent.port, {
        clientName: 'jest',
        secret: SECRET,
      });
      const session = await sessionReady;
      expect(client.agent).toMatchObject({ agent: 'test-agent', interfaces: ['eth0', 'lo'] });
      expect(session.client).toMatchObject({ client: 'jest', version: PROTOCOL_VERSION });

      session.on('subscribe', (port) =>
        port === 9 ? session.failSubscribe(port, 'no such luck') : session.ackSubscribe(port),
      );
      session.on('unsubscribe', (port) => session.ackUnsubscribe(port));
      await client.subscribe(8080);
      await expect(client.subscribe(9)).rejects.toMatchObject({ code: 'subscribe-failed' });

      const events: unknown[] = [];
      for (const name of ['opened', 'data', 'closed', 'counters', 'warning'] as const) {
        client.on(name, (m: unknown) => events.push(m));
      }
      const opened = agentSamples[5] as Extract<AgentMessage, { type: 'opened' }>;
      const connection = withoutType(opened);
      session.sendOpened(connection);
      const big = randomBytes(prng(9), 3 * 1024 * 1024 + 5); // split into messages of < 64 KiB
      session.sendData(0, Buffer.from('hello'), 1);
      session.sendData(0, big, 1);
      session.sendClosed(0, 'fin');
      session.sendCounters(withoutType(agentSamples[14] as CountersMessage));
      session.sendWarning('tap', 'lo is gone');
      session.flush();
      await until(() => events.some((e) => (e as AgentMessage).type === 'error'));
      expect(events[0]).toEqual(opened);
      const data = events.filter((e) => (e as AgentMessage).type === 'data') as DataMessage[];
      // Every frame fits in one 64 KiB socket read, header included.
      expect(data.length).toBeGreaterThan(48);
      for (const d of data) expect(d.bytes.length).toBeLessThan(64 * 1024 - 64);
      const mirrored = Buffer.concat(data.map((d) => d.bytes));
      expect(mirrored.equals(Buffer.concat([Buffer.from('hello'), big]))).toBe(true);
      expect(events).toContainEqual({ type: 'closed', id: 0, reason: 'fin', gapBytes: 0 });
      expect(events).toContainEqual(agentSamples[14]);
      expect(events.at(-1)).toEqual({
        type: 'error',
        code: 'tap',
        message: 'lo is gone',
        fatal: false,
      });

      await client.unsubscribe(8080);
      const ended = once(session, 'end');
      const clientEnded = once(client, 'end');
      await client.close();
      expect(await ended).toEqual([undefined]);
      await clientEnded;
    } finally {
      await agent.close();
    }
  });

  test("a feature's requests: answered in any order, failed, refused when not served, timed out, ended", async () => {
    const agent = await startAgent({ capabilities: ['ipv6', 'env', 'slow', 'broken', 'silent'] });
    try {
      const sessionReady = agent.nextSession();
      const client = await connectToAgent('127.0.0.1', agent.port, {
        secret: SECRET,
        requestTimeoutMs: 300,
      });
      client.on('error', () => undefined);
      const session = await sessionReady;
      const asked: string[] = [];
      session.on('request', (id, feature, body) => {
        asked.push(feature);
        if (feature === 'env')
          session.reply(id, [
            ['A', '1'],
            ['B', 'é'],
          ]);
        else if (feature === 'slow') setTimeout(() => session.reply(id, body), 50);
        else if (feature === 'broken') session.failRequest(id, 'cannot read /proc/1/environ');
      });
      const slow = client.request('slow', ['x', 1, [true]]);
      const env = client.request('env', null);
      expect(await env).toEqual([
        ['A', '1'],
        ['B', 'é'],
      ]);
      expect(await slow).toEqual(['x', 1, [true]]);
      await expect(client.request('broken', null)).rejects.toMatchObject({
        code: 'request-failed',
        message: 'the agent: cannot read /proc/1/environ',
      });
      await expect(client.request('files', null)).rejects.toMatchObject({
        code: 'request-failed',
        message: expect.stringMatching(/does not serve "files".*env/),
      });
      await expect(client.request('silent', null)).rejects.toMatchObject({
        code: 'request-timeout',
      });
      // Never sent: the agent does not claim it.
      expect(asked).toEqual(['slow', 'env', 'broken', 'silent']);
      const pending = client.request('silent', null);
      await client.close();
      await expect(pending).rejects.toMatchObject({ code: 'closed' });
    } finally {
      await agent.close();
    }
  });

  test('requests pipelined with the hello reach the agent after accept()', async () => {
    const agent = await startAgent();
    try {
      const sessionReady = agent.nextSession();
      const { socket } = await rawClient(agent.port);
      socket.write(
        encodeFrame([
          clientMessageToWire({
            type: 'hello',
            version: PROTOCOL_VERSION,
            capabilities: [],
            client: 'raw',
            secret: SECRET,
          }),
          clientMessageToWire({ type: 'subscribe', port: 80 }),
        ]),
      );
      const session = await sessionReady;
      const [port] = await once(session, 'subscribe');
      expect(port).toBe(80);
      socket.destroy();
    } finally {
      await agent.close();
    }
  });

  test('version mismatch: the agent answers refused and closes', async () => {
    const agent = await startAgent();
    try {
      const { socket, received } = await rawClient(agent.port);
      socket.write(clientHello(99));
      const messages = agentDecoder().push(await received);
      expect(messages).toEqual([
        { type: 'refused', version: PROTOCOL_VERSION, reason: expect.stringMatching(/v99/) },
      ]);
      await until(() => agent.failures.length > 0);
      expect(agent.failures[0]).toMatchObject({ code: 'refused' });
    } finally {
      await agent.close();
    }
  });

  test.each([
    ['no secret', ''],
    ['a wrong secret', 'guessed'],
  ])(
    'a hello with %s is refused before any request is read, and the real client still joins',
    async (_, secret) => {
      const agent = await startAgent();
      try {
        const { socket, received } = await rawClient(agent.port);
        // A subscribe pipelined with the hello must not reach the agent.
        socket.write(
          Buffer.concat([
            clientHello(PROTOCOL_VERSION, secret),
            encodeFrame([clientMessageToWire({ type: 'subscribe', port: 22 })]),
          ]),
        );
        expect(agentDecoder().push(await received)).toEqual([
          {
            type: 'refused',
            version: PROTOCOL_VERSION,
            reason:
              'wrong session secret: only the mirrord that started this agent may join its session',
          },
        ]);
        await until(() => agent.failures.length > 0);
        expect(agent.failures[0]).toMatchObject({ code: 'unauthorized' });
        expect(agent.sessions).toEqual([]);

        const error = await connectToAgent('127.0.0.1', agent.port, { secret }).catch(
          (e: unknown) => e,
        );
        expect(error).toMatchObject({ code: 'refused', message: /wrong session secret/ });
        const client = await connectToAgent('127.0.0.1', agent.port, { secret: SECRET });
        expect(agent.sessions).toHaveLength(1);
        await client.close();
      } finally {
        await agent.close();
      }
    },
  );

  test('the client reports refused', async () => {
    const fake = await startRaw((socket) => {
      socket.once('data', () =>
        socket.end(
          encodeFrame([agentMessageToWire({ type: 'refused', version: 2, reason: 'old' })]),
        ),
      );
    });
    try {
      const error = await connectToAgent('127.0.0.1', fake.port, { secret: SECRET }).catch(
        (e: unknown) => e,
      );
      expect(error).toBeInstanceOf(AgentClientError);
      expect(error).toMatchObject({ code: 'refused', message: expect.stringMatching(/v2.*old/) });
    } finally {
      await fake.close();
    }
  });

  test('the client detects a dead agent by keep-alive timeout', async () => {
    const fake = await startRaw((socket) =>
      socket.once('data', () => socket.write(agentHelloFrame)),
    );
    try {
      const client = await connectToAgent('127.0.0.1', fake.port, {
        secret: SECRET,
        keepAliveIntervalMs: 50,
        deadAfterMs: 300,
      });
      const started = Date.now();
      const errors: Error[] = [];
      client.on('error', (e) => errors.push(e));
      // not events.once(): it rejects on 'error'
      await new Promise((resolve) => client.on('end', () => resolve(undefined)));
      expect(errors).toHaveLength(1);
      expect(errors[0]).toMatchObject({ code: 'dead-agent' });
      expect(Date.now() - started).toBeGreaterThanOrEqual(250);
    } finally {
      await fake.close();
    }
  });

  test('handshake timeout', async () => {
    const fake = await startRaw(() => {});
    try {
      await expect(
        connectToAgent('127.0.0.1', fake.port, { secret: SECRET, handshakeTimeoutMs: 100 }),
      ).rejects.toMatchObject({ code: 'handshake-timeout' });
    } finally {
      await fake.close();
    }
  });

  test('the client rejects a protocol violation by the agent', async () => {
    const fake = await startRaw((socket) =>
      socket.once('data', () => {
        socket.write(agentHelloFrame);
        socket.write(
          encodeFrame([
            agentMessageToWire({ type: 'data', id: 7, bytes: Buffer.from('x'), tapMicros: 7 }),
          ]),
        );
      }),
    );
    try {
      const client = await AgentClient.start(
        await new Promise<net.Socket>((resolve) => {
          const s = net.connect(fake.port, '127.0.0.1', () => resolve(s));
        }),
        { secret: SECRET },
      );
      const [error] = (await once(client, 'error')) as [Error];
      expect(error).toBeInstanceOf(ProtocolError);
      expect(error.message).toMatch(/connection 7, which is not open/);
    } finally {
      await fake.close();
    }
  });

  test('the agent sees needsDrain when the client does not read, and drain after', async () => {
    const agent = await startAgent();
    try {
      const sessionReady = agent.nextSession();
      const socket = net.connect(agent.port, '127.0.0.1');
      await once(socket, 'connect');
      const client = await AgentClient.start(socket, { secret: SECRET });
      const session = await sessionReady;
      const connection = withoutType(agentSamples[5] as Extract<AgentMessage, { type: 'opened' }>);
      const received: Buffer[] = [];
      let receivedBytes = 0;
      client.on('data', (m) => {
        received.push(Buffer.from(m.bytes));
        receivedBytes += m.bytes.length;
      });
      // The client stops reading: what the agent sends piles up in the sockets.
      socket.pause();
      session.sendOpened(connection);
      // Distinct bytes in every chunk, and one reused source buffer as the tap's batch is: a
      // frame whose memory were reused before the socket wrote it would show up as wrong bytes.
      const source = Buffer.alloc(100_000);
      const random = prng(11);
      const sent: Buffer[] = [];
      let sentBytes = 0;
      for (let i = 0; i < 10_000; i++) {
        const chunk = source.subarray(0, 1 + Math.floor(random() * source.length));
        for (let j = 0; j < chunk.length; j += 997) chunk[j] = Math.floor(random() * 256);
        sent.push(Buffer.from(chunk));
        sentBytes += chunk.length;
        session.sendData(0, chunk, 1);
        // Past needsDrain, as the agent goes on up to its pause: frames wait in the stream.
        if (!session.flush() && session.backlogBytes > 2 * 1024 * 1024) break;
        // Let the socket move bytes to the kernel, as the agent's event loop would.
        if (i % 16 === 0) await new Promise(setImmediate);
      }
      expect(session.needsDrain).toBe(true);
      const drained = once(session, 'drain');
      socket.resume();
      await drained;
      await until(() => receivedBytes === sentBytes);
      expect(Buffer.concat(received).equals(Buffer.concat(sent))).toBe(true);
      await client.close();
    } finally {
      await agent.close();
    }
  });

  test('garbage from a client ends the session with an error, the agent survives', async () => {
    const agent = await startAgent({ idleTimeoutMs: 60_000 });
    try {
      // Before the handshake: accept() rejects.
      const first = await rawClient(agent.port);
      first.socket.write(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
      const answer = agentDecoder().push(await first.received);
      expect(answer).toEqual([
        {
          type: 'error',
          code: 'protocol',
          message: expect.stringMatching(/exceeds the limit/),
          fatal: true,
        },
      ]);
      await until(() => agent.failures.length === 1);
      expect(agent.failures[0]).toBeInstanceOf(ProtocolError);

      // After it: 'end' carries the ProtocolError.
      const sessionReady = agent.nextSession();
      const second = await rawClient(agent.port);
      second.socket.write(clientHello());
      const session = await sessionReady;
      const ended = once(session, 'end');
      second.socket.write(wireFrame([0x02, 'eighty']));
      const [error] = (await ended) as [Error];
      expect(error).toBeInstanceOf(ProtocolError);
      expect(error.message).toMatch(/subscribe\.port/);
      const messages = agentDecoder().push(await second.received);
      expect(messages.at(-1)).toMatchObject({ type: 'error', code: 'protocol', fatal: true });
    } finally {
      await agent.close();
    }
  });

  test('the agent ends a session whose client went silent', async () => {
    const agent = await startAgent({ idleTimeoutMs: 200 });
    try {
      const sessionReady = agent.nextSession();
      const { socket, received } = await rawClient(agent.port);
      socket.write(clientHello());
      const session = await sessionReady;
      const [error] = (await once(session, 'end')) as [Error];
      expect(error).toBeInstanceOf(AgentSessionError);
      expect(error).toMatchObject({ code: 'idle-timeout' });
      const messages = agentDecoder().push(await received);
      expect(messages.at(-1)).toMatchObject({ type: 'error', code: 'idle-timeout', fatal: true });
    } finally {
      await agent.close();
    }
  });
});

describe('clock', () => {
  test("the agent's clock is mapped onto ours within half the best round trip", () => {
    const clock = new AgentClock();
    const agentAhead = 5_000_000_000; // another machine's clock: 5 000 s ahead
    const random = prng(3);
    let now = 1_000_000;
    let bestHalfRoundTrip = Infinity;
    for (let i = 0; i < 50; i++) {
      // Answers come back after 0.2–20 ms, the agent read its clock anywhere in between.
      const roundTrip = 200 + Math.floor(random() * 20_000);
      const agentReadAt = now + Math.floor(random() * roundTrip);
      clock.sample(now, agentReadAt + agentAhead, now + roundTrip);
      bestHalfRoundTrip = Math.min(bestHalfRoundTrip, roundTrip / 2);
      now += 5_000_000;
    }
    const error = Math.abs(clock.toLocal(now + agentAhead) - now);
    expect(error).toBeLessThanOrEqual(bestHalfRoundTrip * 1.5 + 100);
    expect(error).toBeLessThan(20_000 / 2);
  });

  test('a drifting clock is followed: samples are renewed even when slower', () => {
    const clock = new AgentClock();
    clock.sample(0, 1_000, 100); // a quick first sample: offset 950
    // 61 s later the agent's clock ran 6 ms ahead, and round trips are now 10 ms.
    clock.sample(61_000_000, 61_000_000 + 950 + 6_000 + 5_000, 61_010_000);
    expect(Math.abs(clock.toLocal(62_000_000 + 950 + 6_000) - 62_000_000)).toBeLessThanOrEqual(
      5_000,
    );
  });

  test('a slow first round trip (a fresh port-forward) skews the lag for less than a second', async () => {
    // An agent on this machine (true offset 0) whose answers are stamped when the requests
    // arrive, but whose first three (the hello and two pongs) reach the client 200 ms late, in
    // order, as over a port-forward whose first frames take a slow path back: the hello and
    // the first pings are poor clock samples, by up to 100 ms.
    const SLOW_ANSWERS = 3;
    const SLOW_BY_MS = 200;
    const fake = await startRaw((socket) => {
      const decoder = clientDecoder();
      let answers = 0;
      let lastReleaseAt = 0;
      const answer = (message: AgentMessage): void => {
        const frame = encodeFrame([agentMessageToWire(message)]);
        const delay = answers++ < SLOW_ANSWERS ? SLOW_BY_MS : 0;
        // A stream keeps its order: an answer never overtakes a slow one before it.
        lastReleaseAt = Math.max(lastReleaseAt, Date.now() + delay);
        setTimeout(() => socket.write(frame), lastReleaseAt - Date.now());
      };
      socket.on('data', (chunk: Buffer) => {
        for (const message of decoder.push(chunk)) {
          const clockMicros = monotonicMicros();
          if (message.type === 'hello') {
            answer({ ...(agentSamples[0] as AgentHelloMessage), clockMicros });
          } else if (message.type === 'ping') {
            answer({ type: 'pong', nonce: message.nonce, clockMicros });
          }
        }
      });
    });
    try {
      const client = await connectToAgent('127.0.0.1', fake.port, { secret: SECRET });
      try {
        // The hello's sample: the agent seems ~100 ms behind, so fresh bytes seem 100 ms early.
        expect(client.lagMicros(monotonicMicros())).toBeLessThan(-50_000);
        // The keep-alive interval is 5 s: within a second, only quick start-up pings fix it.
        await until(() => Math.abs(client.lagMicros(monotonicMicros())) < 5_000, 1_000);
      } finally {
        await client.close();
      }
    } finally {
      await fake.close();
    }
  });

  test('on one machine, lag from a just-taken stamp is about zero', async () => {
    const agent = await startAgent();
    try {
      const client = await connectToAgent('127.0.0.1', agent.port, { secret: SECRET });
      const lag = client.lagMicros(monotonicMicros());
      expect(lag).toBeGreaterThan(-5_000);
      expect(lag).toBeLessThan(5_000);
      expect(client.lagMicros(monotonicMicros() - 250_000)).toBeGreaterThanOrEqual(245_000);
      await client.close();
    } finally {
      await agent.close();
    }
  });
});
