import { createCipheriv } from 'node:crypto';
import {
  Reassembler,
  type ConnectionOpened,
  type ReassemblyLimits,
  type ReassemblySink,
} from '../src/agent/reassembly.js';
import { TcpFlag, type FlowEndpoints, type TapSegment } from '../src/agent/segment.js';
import type { CloseReason } from '../src/protocol/messages.js';
import { prng } from './support/prng.js';

const { SYN, FIN, RST, ACK, PSH } = TcpFlag;
const SEQ_MOD = 2 ** 32;

function randInt(rng: () => number, lo: number, hi: number): number {
  return lo + Math.floor(rng() * (hi - lo + 1));
}

function shuffle<T>(rng: () => number, items: T[]): T[] {
  const out = items.slice();
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(rng() * (i + 1));
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

/** Deterministic bytes from an AES-CTR keystream: a byte-by-byte loop is slow under jest. */
function randomBytes(rng: () => number, length: number): Buffer {
  const key = Buffer.alloc(16);
  for (let i = 0; i < 16; i += 4) key.writeUInt32LE(Math.floor(rng() * SEQ_MOD), i);
  return createCipheriv('aes-128-ctr', key, Buffer.alloc(16)).update(Buffer.alloc(length));
}

/** Cuts [0, length) into consecutive [start, end) pieces of 1..maxSize bytes. */
function cut(rng: () => number, length: number, maxSize: number): [number, number][] {
  const pieces: [number, number][] = [];
  for (let start = 0; start < length;) {
    const end = Math.min(length, start + randInt(rng, 1, maxSize));
    pieces.push([start, end]);
    start = end;
  }
  return pieces;
}

function endpointsFor(n: number): FlowEndpoints {
  return {
    family: 4,
    clientAddress: `10.213.${n >> 8}.${n & 255}`,
    clientPort: 40000 + (n % 20000),
    serverAddress: '10.213.255.1',
    serverPort: 8080,
    ifindex: 2,
  };
}

function segment(
  key: string,
  seq: number,
  flags: number,
  payload: Buffer = Buffer.alloc(0),
): TapSegment {
  const n = Number(key.replace(/\D/g, '')) || 0;
  return {
    flowKey: key,
    seq: seq >>> 0,
    flags,
    payload,
    tapMicros: 0,
    endpoints: () => endpointsFor(n),
  };
}

/** A client's view of one connection: builds its segments by stream offset. */
class Client {
  constructor(
    readonly key: string,
    readonly isn: number,
    readonly stream: Buffer,
  ) {}

  syn(): TapSegment {
    return segment(this.key, this.isn, SYN);
  }

  data(start: number, end: number, flags = ACK | PSH): TapSegment {
    return segment(this.key, this.isn + 1 + start, flags, this.stream.subarray(start, end));
  }

  fin(): TapSegment {
    return segment(this.key, this.isn + 1 + this.stream.length, FIN | ACK);
  }

  rst(at = this.stream.length): TapSegment {
    return segment(this.key, this.isn + 1 + at, RST);
  }
}

interface Record {
  opened: ConnectionOpened;
  chunks: Buffer[];
  closed?: { reason: CloseReason; gapBytes: number };
}

/**
 * Records what the sink sees and throws on any call that breaks the sink's contract (plain
 * checks rather than `expect`, which is slow when called per chunk).
 */
class RecordingSink implements ReassemblySink {
  readonly byId = new Map<number, Record>();
  readonly order: number[] = [];

  opened(connection: ConnectionOpened): void {
    if (this.byId.has(connection.id)) throw new Error(`connection ${connection.id} opened twice`);
    this.byId.set(connection.id, { opened: connection, chunks: [] });
    this.order.push(connection.id);
  }

  data(id: number, bytes: Buffer): void {
    const record = this.get(id);
    if (record.closed !== undefined) throw new Error(`data for closed connection ${id}`);
    if (bytes.length === 0) throw new Error(`empty data for connection ${id}`);
    record.chunks.push(Buffer.from(bytes));
  }

  closed(id: number, reason: CloseReason, gapBytes: number): void {
    const record = this.get(id);
    if (record.closed !== undefined) throw new Error(`connection ${id} closed twice`);
    if (reason !== 'broken' && gapBytes !== 0) throw new Error(`gapBytes with '${reason}'`);
    record.closed = { reason, gapBytes };
  }

  get(id: number): Record {
    const record = this.byId.get(id);
    if (record === undefined) throw new Error(`no connection ${id} opened`);
    return record;
  }

  bytes(id: number): Buffer {
    return Buffer.concat(this.get(id).chunks);
  }

  only(): Record & { id: number; bytes: Buffer } {
    expect(this.order).toHaveLength(1);
    const id = this.order[0]!;
    return { ...this.get(id), id, bytes: this.bytes(id) };
  }
}

/**
 * Every Reassembler of these tests, with its sink: after each test, each must have counted every
 * byte pushed into it once, as delivered (what the sink got), ignored, dropped, or still held.
 */
const created: { reassembler: Reassembler; sink: ReassemblySink }[] = [];

class CountedReassembler extends Reassembler {
  constructor(sink: ReassemblySink, limits?: Partial<ReassemblyLimits>) {
    super(sink, limits);
    created.push({ reassembler: this, sink });
  }
}

afterEach(() => {
  for (const { reassembler: r, sink } of created.splice(0)) {
    expect(r.pushedBytes).toBe(
      r.deliveredBytes + r.ignoredBytes + r.droppedBytes + r.bufferedBytes,
    );
    if (sink instanceof RecordingSink) {
      let delivered = 0;
      for (const id of sink.order) delivered += sink.bytes(id).length;
      expect(r.deliveredBytes).toBe(delivered);
    }
  }
});

function run(
  segments: TapSegment[],
  limits?: Partial<ReassemblyLimits>,
): { sink: RecordingSink; reassembler: Reassembler } {
  const sink = new RecordingSink();
  const reassembler = new CountedReassembler(sink, limits);
  segments.forEach((s, i) => reassembler.push(s, i));
  return { sink, reassembler };
}

function expectWhole(sink: RecordingSink, reassembler: Reassembler, stream: Buffer): void {
  const record = sink.only();
  expect(record.opened.midStream).toBe(false);
  expect(record.bytes.equals(stream)).toBe(true);
  expect(record.closed).toEqual({ reason: 'fin', gapBytes: 0 });
  expect(reassembler.connectionCount).toBe(0);
  expect(reassembler.bufferedBytes).toBe(0);
}

describe('Reassembler: orderings', () => {
  test('in order, with SYN and FIN, opens once with the endpoints and delivers the stream', () => {
    const rng = prng(1);
    const client = new Client('c1', 1000, randomBytes(rng, 50_000));
    const segments = [client.syn(), ...cut(rng, 50_000, 3000).map(([a, b]) => client.data(a, b))];
    const { sink, reassembler } = run([...segments, client.fin()]);
    expectWhole(sink, reassembler, client.stream);
    const { opened } = sink.only();
    expect(opened).toEqual({ ...endpointsFor(1), id: 1, midStream: false });
  });

  test('in-order bytes are passed through without copying; held bytes are copies', () => {
    const batch = Buffer.alloc(1 << 20, 7);
    const delivered: Buffer[] = [];
    const reassembler = new CountedReassembler({
      opened: () => undefined,
      data: (_id, bytes) => delivered.push(bytes),
      closed: () => undefined,
    });
    reassembler.push(segment('k', 99, SYN), 0);
    reassembler.push(segment('k', 100, ACK, batch.subarray(0, 10)), 0);
    reassembler.push(segment('k', 120, ACK, batch.subarray(20, 30)), 0);
    batch.fill(9, 20, 30);
    reassembler.push(segment('k', 110, ACK, batch.subarray(10, 20)), 0);
    expect(delivered).toHaveLength(3);
    expect(delivered[0]!.buffer).toBe(batch.buffer);
    expect(delivered[1]!.buffer).toBe(batch.buffer);
    expect(delivered[2]!.buffer).not.toBe(batch.buffer);
    expect(delivered[2]!.equals(Buffer.alloc(10, 7))).toBe(true);
  });

  test('random permutations of data and FIN after the SYN', () => {
    for (let seed = 1; seed <= 300; seed++) {
      const rng = prng(seed);
      const length = randInt(rng, 1, 20_000);
      const client = new Client('c', randInt(rng, 0, SEQ_MOD - 1), randomBytes(rng, length));
      const rest = cut(rng, length, randInt(rng, 1, 4000)).map(([a, b]) => client.data(a, b));
      const { sink, reassembler } = run([client.syn(), ...shuffle(rng, [...rest, client.fin()])]);
      expectWhole(sink, reassembler, client.stream);
    }
  });

  test('duplicates, losses and overlapping retransmissions cut differently', () => {
    for (let seed = 1; seed <= 300; seed++) {
      const rng = prng(1000 + seed);
      const length = randInt(rng, 1, 30_000);
      const client = new Client('c', randInt(rng, 0, SEQ_MOD - 1), randomBytes(rng, length));
      const first = cut(rng, length, 1500).filter(() => rng() > 0.3);
      const retransmit = cut(rng, length, 6000);
      const duplicates = first.filter(() => rng() < 0.3);
      const all = [...first, ...duplicates, ...retransmit].map(([a, b]) => client.data(a, b));
      const fins = rng() < 0.5 ? [client.fin()] : [client.fin(), client.fin()];
      const { sink, reassembler } = run([client.syn(), ...shuffle(rng, [...all, ...fins])]);
      expectWhole(sink, reassembler, client.stream);
    }
  });

  test('sequence numbers wrap around 2^32', () => {
    for (const isn of [SEQ_MOD - 1, SEQ_MOD - 2, SEQ_MOD - 5000, SEQ_MOD - 65_536]) {
      for (let seed = 1; seed <= 40; seed++) {
        const rng = prng(isn + seed);
        const client = new Client('c', isn, randomBytes(rng, 100_000));
        const first = cut(rng, 100_000, 9000).filter(() => rng() > 0.2);
        const retransmit = cut(rng, 100_000, 20_000);
        const all = [...first, ...retransmit].map(([a, b]) => client.data(a, b));
        const { sink, reassembler } = run([client.syn(), ...shuffle(rng, [...all, client.fin()])]);
        expectWhole(sink, reassembler, client.stream);
      }
    }
  });

  test('a SYN carrying data, and SYN retransmits, are handled', () => {
    const client = new Client('c', 500, Buffer.from('hello, world'));
    const { sink, reassembler } = run([
      segment('c', 500, SYN, client.stream.subarray(0, 5)),
      client.syn(),
      segment('c', 500, SYN, client.stream.subarray(0, 5)),
      client.data(3, 12),
      client.fin(),
    ]);
    expectWhole(sink, reassembler, client.stream);
  });

  test('the FIN arriving before the data closes only once all bytes are delivered', () => {
    const client = new Client('c', 7, Buffer.from('abcdefghij'));
    const sink = new RecordingSink();
    const reassembler = new CountedReassembler(sink);
    for (const s of [client.syn(), client.fin(), client.data(5, 10), client.data(0, 2)]) {
      reassembler.push(s, 0);
    }
    expect(sink.only().closed).toBeUndefined();
    expect(reassembler.bufferedBytes).toBe(5);
    reassembler.push(client.data(2, 5), 0);
    expectWhole(sink, reassembler, client.stream);
  });

  test('data past the FIN is ignored, held or not', () => {
    const client = new Client('c', 7, Buffer.from('abcdefghij'));
    const extra = segment('c', 7 + 1 + 8, ACK, Buffer.from('ijK'));
    const { sink, reassembler } = run([
      client.syn(),
      extra,
      segment('c', 7 + 1 + 11, ACK, Buffer.from('LM')),
      client.data(0, 3),
      client.fin(),
      segment('c', 7 + 1 + 10, ACK, Buffer.from('XYZ')),
      client.data(3, 8),
    ]);
    expectWhole(sink, reassembler, client.stream);
  });

  test('a FIN that also carries the last bytes', () => {
    const client = new Client('c', 1, Buffer.from('abcdef'));
    const { sink, reassembler } = run([
      client.syn(),
      client.data(3, 6, FIN | ACK),
      client.data(0, 3),
    ]);
    expectWhole(sink, reassembler, client.stream);
  });
});

describe('Reassembler: joining mid-stream', () => {
  test('the first seen segment sets the start; earlier bytes are never delivered', () => {
    for (let seed = 1; seed <= 100; seed++) {
      const rng = prng(5000 + seed);
      const length = randInt(rng, 2, 20_000);
      const client = new Client('c', randInt(rng, 0, SEQ_MOD - 1), randomBytes(rng, length));
      const segments = shuffle(
        rng,
        cut(rng, length, 2000).map(([a, b]) => client.data(a, b)),
      );
      const firstStart = (segments[0]!.seq - client.isn - 1 + SEQ_MOD) % SEQ_MOD;
      const { sink, reassembler } = run([...segments, client.fin()]);
      const record = sink.only();
      expect(record.opened.midStream).toBe(true);
      expect(record.bytes.equals(client.stream.subarray(firstStart))).toBe(true);
      expect(record.closed).toEqual({ reason: 'fin', gapBytes: 0 });
      expect(reassembler.bufferedBytes).toBe(0);
    }
  });

  test('a SYN reordered behind the first data of its connection is the same stream', () => {
    const client = new Client('c', 40, Buffer.from('0123456789'));
    const { sink, reassembler } = run([
      client.data(0, 4),
      client.syn(),
      client.data(4, 10),
      client.fin(),
    ]);
    const record = sink.only();
    expect(record.opened.midStream).toBe(true);
    expect(record.bytes.equals(client.stream)).toBe(true);
    expect(record.closed?.reason).toBe('fin');
    expect(reassembler.connectionCount).toBe(0);
  });

  test('a bare FIN or RST of an unknown connection opens nothing', () => {
    const client = new Client('c', 40, Buffer.from('0123456789'));
    const { sink, reassembler } = run([client.fin(), client.rst()]);
    expect(sink.order).toHaveLength(0);
    expect(reassembler.connectionCount).toBe(0);
  });
});

describe('Reassembler: RST, reuse and closed keys', () => {
  test('RST closes at once, drops held bytes, and later segments stay silent', () => {
    const client = new Client('c', 10, Buffer.from('abcdefghijkl'));
    const { sink, reassembler } = run([
      client.syn(),
      client.data(0, 4),
      client.data(8, 12),
      client.rst(4),
      client.data(4, 8),
      client.data(0, 12),
      client.fin(),
    ]);
    const record = sink.only();
    expect(record.bytes.toString()).toBe('abcd');
    expect(record.closed).toEqual({ reason: 'rst', gapBytes: 0 });
    expect(reassembler.bufferedBytes).toBe(0);
    expect(reassembler.connectionCount).toBe(0);
    // 'ijkl' waited behind the hole: stream bytes the reset cost. What came after the reset
    // ('efgh', the whole stream again) the target threw away too: no stream data.
    expect({
      delivered: reassembler.deliveredBytes,
      dropped: reassembler.droppedBytes,
      ignored: reassembler.ignoredBytes,
    }).toEqual({ delivered: 4, dropped: 4, ignored: 4 + 12 });
  });

  test('a late retransmit after FIN opens nothing, until the key has been quiet a minute', () => {
    const client = new Client('c', 10, Buffer.from('abcdef'));
    const sink = new RecordingSink();
    const reassembler = new CountedReassembler(sink);
    for (const s of [client.syn(), client.data(0, 6), client.fin()]) reassembler.push(s, 0);
    reassembler.push(client.data(2, 6), 1000);
    reassembler.push(client.fin(), 30_000);
    reassembler.sweep(60_000);
    reassembler.push(client.data(0, 6), 60_000);
    reassembler.sweep(89_999);
    reassembler.push(client.data(0, 6), 89_999);
    expect(sink.order).toEqual([1]);
    reassembler.sweep(150_000);
    reassembler.push(client.data(0, 6), 150_000);
    expect(sink.order).toEqual([1, 2]);
    expect(sink.get(2).opened.midStream).toBe(true);
  });

  test('the memory of closed keys is bounded by maxConnections', () => {
    const clients = [1, 2, 3].map((n) => new Client(`k${n}`, n, Buffer.from('ab')));
    const { sink } = run(
      [...clients.flatMap((c) => [c.syn(), c.data(0, 2), c.fin()]), clients[0]!.data(0, 2)],
      { maxConnections: 2 },
    );
    expect(sink.order).toEqual([1, 2, 3, 4]);
    expect(sink.get(4).opened.midStream).toBe(true);
  });

  test('a late SYN retransmit of a closed connection is ignored; a new ISN opens anew', () => {
    const old = new Client('c', 10, Buffer.from('abc'));
    const next = new Client('c', 123_456, Buffer.from('defgh'));
    const { sink, reassembler } = run([
      old.syn(),
      old.data(0, 3),
      old.fin(),
      old.syn(),
      next.syn(),
      next.data(0, 5),
      next.fin(),
    ]);
    expect(sink.order).toEqual([1, 2]);
    expect(sink.bytes(1).toString()).toBe('abc');
    expect(sink.bytes(2).toString()).toBe('defgh');
    expect(sink.get(2).opened.midStream).toBe(false);
    expect(sink.get(2).closed?.reason).toBe('fin');
    expect(reassembler.connectionCount).toBe(0);
  });

  test('tuple reuse: a SYN with a new ISN on an open key closes the old one as expired', () => {
    const old = new Client('c', 10, Buffer.from('abc'));
    const next = new Client('c', SEQ_MOD - 2, Buffer.from('defgh'));
    const { sink, reassembler } = run([
      old.syn(),
      old.data(0, 3),
      next.syn(),
      old.data(0, 3),
      next.data(0, 5),
      next.fin(),
    ]);
    expect(sink.order).toEqual([1, 2]);
    expect(sink.get(1).closed).toEqual({ reason: 'expired', gapBytes: 0 });
    expect(sink.bytes(1).toString()).toBe('abc');
    expect(sink.bytes(2).toString()).toBe('defgh');
    expect(sink.get(2).closed?.reason).toBe('fin');
    expect(reassembler.connectionCount).toBe(0);
  });

  test('tuple reuse while bytes wait behind a hole reports the old one broken', () => {
    const old = new Client('c', 10, Buffer.from('abcdefgh'));
    const next = new Client('c', 9999, Buffer.from('x'));
    const { sink, reassembler } = run([
      old.syn(),
      old.data(0, 2),
      old.data(5, 8),
      old.fin(),
      next.syn(),
    ]);
    expect(sink.get(1).closed).toEqual({ reason: 'broken', gapBytes: 3 });
    expect(sink.bytes(1).toString()).toBe('ab');
    expect(reassembler.bufferedBytes).toBe(0);
    expect(reassembler.connectionCount).toBe(1);
  });

  test('a SYN on a mid-stream connection with an unrelated ISN is a reuse', () => {
    const old = new Client('c', 10, Buffer.from('abcdef'));
    const next = new Client('c', 5000, Buffer.from('xyz'));
    const { sink } = run([old.data(2, 6), next.syn(), next.data(0, 3), next.fin()]);
    expect(sink.order).toEqual([1, 2]);
    expect(sink.get(1).closed?.reason).toBe('expired');
    expect(sink.bytes(2).toString()).toBe('xyz');
  });
});

describe('Reassembler: bounded memory', () => {
  test('exceeding the per-connection limit breaks the connection with the hole size', () => {
    const rng = prng(7);
    const client = new Client('c', SEQ_MOD - 100, randomBytes(rng, 10_000));
    const sink = new RecordingSink();
    const reassembler = new CountedReassembler(sink, { maxBufferedPerConnection: 3000 });
    for (const s of [
      client.syn(),
      client.data(0, 1000),
      client.data(2500, 4000),
      client.data(3000, 5000),
      client.data(4000, 4100),
    ]) {
      reassembler.push(s, 0);
    }
    expect(reassembler.bufferedBytes).toBe(2500);
    expect(sink.only().closed).toBeUndefined();
    reassembler.push(client.data(6000, 7000), 0);
    expect(sink.only().closed).toEqual({ reason: 'broken', gapBytes: 1500 });
    expect(reassembler.bufferedBytes).toBe(0);
    expect(reassembler.connectionCount).toBe(0);
    for (const s of [client.data(1000, 10_000), client.fin()]) reassembler.push(s, 0);
    expect(sink.bytes(1).equals(client.stream.subarray(0, 1000))).toBe(true);
    expect(sink.order).toEqual([1]);
    // Given up on: what was held (2500), what did not fit (1000), what its client sent after
    // (9000) are stream bytes dropped; the copies among them (1500 + 100 held twice) are not.
    expect({
      delivered: reassembler.deliveredBytes,
      dropped: reassembler.droppedBytes,
      ignored: reassembler.ignoredBytes,
    }).toEqual({ delivered: 1000, dropped: 2500 + 1000 + 9000, ignored: 1000 + 100 });
  });

  test('duplicates of held bytes are not counted twice toward the limit', () => {
    const client = new Client('c', 0, Buffer.alloc(100, 1));
    const { sink, reassembler } = run(
      [client.syn(), ...Array.from({ length: 20 }, () => client.data(50, 100))],
      { maxBufferedPerConnection: 60 },
    );
    expect(reassembler.bufferedBytes).toBe(50);
    expect(sink.only().closed).toBeUndefined();
  });

  test('overlapping held copies: the first copy wins, byte for byte', () => {
    const client = new Client('c', 3, Buffer.from('abcdefghij'));
    const { sink, reassembler } = run([
      client.syn(),
      client.data(0, 2),
      segment('c', 3 + 1 + 5, ACK, Buffer.from('XYZ')),
      segment('c', 3 + 1 + 4, ACK, Buffer.from('pqrstu')),
    ]);
    expect(reassembler.bufferedBytes).toBe(6);
    reassembler.push(client.data(2, 4), 0);
    expect(sink.bytes(1).toString()).toBe('abcdpXYZtu');
    expect(reassembler.bufferedBytes).toBe(0);
  });

  test('exceeding the total limit breaks the connection that tried to hold more', () => {
    const a = new Client('a1', 0, Buffer.alloc(5000, 1));
    const b = new Client('b2', 77, Buffer.alloc(5000, 2));
    const sink = new RecordingSink();
    const reassembler = new CountedReassembler(sink, {
      maxBufferedPerConnection: 4000,
      maxBufferedTotal: 6000,
    });
    for (const s of [a.syn(), b.syn(), a.data(1000, 4500), b.data(0, 200), b.data(2000, 4600)]) {
      reassembler.push(s, 0);
    }
    expect(sink.get(1).closed).toBeUndefined();
    expect(sink.get(2).closed).toEqual({ reason: 'broken', gapBytes: 1800 });
    expect(sink.bytes(2)).toHaveLength(200);
    expect(reassembler.bufferedBytes).toBe(3500);
    for (const s of [a.data(0, 1000), a.data(4500, 5000), a.fin()]) reassembler.push(s, 0);
    expect(sink.bytes(1).equals(a.stream)).toBe(true);
    expect(sink.get(1).closed?.reason).toBe('fin');
    expect(reassembler.bufferedBytes).toBe(0);
  });

  test('limits must be positive', () => {
    const sink = new RecordingSink();
    expect(() => new CountedReassembler(sink, { maxBufferedTotal: 0 })).toThrow(RangeError);
    expect(() => new CountedReassembler(sink, { idleTimeoutMs: Number.NaN })).toThrow(RangeError);
    expect(() => new CountedReassembler(sink, { idleTimeoutMs: undefined })).not.toThrow();
  });
});

describe('Reassembler: timeouts', () => {
  test('a hole not filled within the hole timeout breaks the connection', () => {
    const client = new Client('c', 100, Buffer.from('abcdefghij'));
    const sink = new RecordingSink();
    const reassembler = new CountedReassembler(sink, { holeTimeoutMs: 5000 });
    reassembler.push(client.syn(), 0);
    reassembler.push(client.data(0, 2), 0);
    reassembler.push(client.data(6, 8), 1000);
    reassembler.sweep(5999);
    expect(sink.only().closed).toBeUndefined();
    // Progress on the hole restarts the clock.
    reassembler.push(client.data(2, 4), 5000);
    reassembler.sweep(9999);
    expect(sink.only().closed).toBeUndefined();
    reassembler.sweep(10_000);
    expect(sink.only().closed).toEqual({ reason: 'broken', gapBytes: 2 });
    expect(sink.bytes(1).toString()).toBe('abcd');
    expect(reassembler.bufferedBytes).toBe(0);
    reassembler.push(client.data(4, 10), 10_001);
    expect(sink.order).toEqual([1]);
  });

  test('a FIN waiting behind a hole is subject to the hole timeout', () => {
    const client = new Client('c', 100, Buffer.from('abcdefghij'));
    const sink = new RecordingSink();
    const reassembler = new CountedReassembler(sink, { holeTimeoutMs: 5000 });
    for (const s of [client.syn(), client.data(0, 4), client.fin()]) reassembler.push(s, 0);
    reassembler.sweep(5000);
    expect(sink.only().closed).toEqual({ reason: 'broken', gapBytes: 6 });
  });

  test('filling the hole in time clears it', () => {
    const client = new Client('c', 100, Buffer.from('abcdefghij'));
    const sink = new RecordingSink();
    const reassembler = new CountedReassembler(sink, { holeTimeoutMs: 5000 });
    for (const s of [client.syn(), client.data(5, 10), client.data(0, 5)]) reassembler.push(s, 0);
    reassembler.sweep(60_000);
    expect(sink.only().closed).toBeUndefined();
    expect(sink.bytes(1).equals(client.stream)).toBe(true);
  });

  test('idle connections expire; active ones do not', () => {
    const sink = new RecordingSink();
    const reassembler = new CountedReassembler(sink, { idleTimeoutMs: 10_000 });
    const a = new Client('a1', 1, Buffer.alloc(100, 1));
    const b = new Client('b2', 2, Buffer.alloc(100, 2));
    reassembler.push(a.syn(), 0);
    reassembler.push(b.syn(), 1);
    for (let t = 0; t < 30; t++) {
      reassembler.push(b.data(t, t + 1), t * 1000);
      reassembler.sweep(t * 1000);
    }
    expect(sink.get(1).closed).toEqual({ reason: 'expired', gapBytes: 0 });
    expect(sink.get(2).closed).toBeUndefined();
    expect(reassembler.connectionCount).toBe(1);
    reassembler.sweep(39_000);
    expect(sink.get(2).closed).toEqual({ reason: 'expired', gapBytes: 0 });
    expect(sink.bytes(2).equals(b.stream.subarray(0, 30))).toBe(true);
    expect(reassembler.connectionCount).toBe(0);
  });

  test('past maxConnections the least recently seen connection is expired', () => {
    const sink = new RecordingSink();
    const reassembler = new CountedReassembler(sink, { maxConnections: 3 });
    const clients = [1, 2, 3, 4].map((n) => new Client(`k${n}`, n * 1000, Buffer.from('xy')));
    clients.slice(0, 3).forEach((c, t) => reassembler.push(c.syn(), t));
    reassembler.push(clients[0]!.data(0, 1), 3);
    reassembler.push(clients[3]!.syn(), 4);
    expect(sink.get(2).closed).toEqual({ reason: 'expired', gapBytes: 0 });
    expect(sink.get(1).closed).toBeUndefined();
    expect(reassembler.connectionCount).toBe(3);
  });
});

describe('Reassembler: many connections', () => {
  test('600 interleaved connections with reordering and retransmissions', () => {
    const rng = prng(42);
    const sink = new RecordingSink();
    const reassembler = new CountedReassembler(sink);
    const queues: TapSegment[][] = [];
    const clients: Client[] = [];
    for (let n = 0; n < 600; n++) {
      const length = randInt(rng, 0, 5000);
      const client = new Client(`f${n}`, randInt(rng, 0, SEQ_MOD - 1), randomBytes(rng, length));
      clients.push(client);
      const first = cut(rng, length, 700).filter(() => rng() > 0.1);
      const retransmit = cut(rng, length, 2000);
      const segments = [...first, ...retransmit].map(([a, b]) => client.data(a, b));
      // Mostly in order, with local swaps the way multi-queue NICs reorder.
      for (let i = 0; i + 1 < segments.length; i++) {
        if (rng() < 0.2) [segments[i], segments[i + 1]] = [segments[i + 1]!, segments[i]!];
      }
      queues.push([client.syn(), ...segments, client.fin()]);
    }
    let now = 0;
    for (let live = queues.filter((q) => q.length > 0); live.length > 0;) {
      const queue = live[Math.floor(rng() * live.length)]!;
      reassembler.push(queue.shift()!, now++);
      if (queue.length === 0) live = live.filter((q) => q.length > 0);
    }
    expect(sink.order).toHaveLength(600);
    expect(sink.order).toEqual(Array.from({ length: 600 }, (_, i) => i + 1));
    const idByAddress = new Map(sink.order.map((id) => [sink.get(id).opened.clientAddress, id]));
    clients.forEach((client, n) => {
      const id = idByAddress.get(endpointsFor(n).clientAddress)!;
      expect(sink.bytes(id).equals(client.stream)).toBe(true);
      expect(sink.get(id).closed).toEqual({ reason: 'fin', gapBytes: 0 });
    });
    expect(reassembler.connectionCount).toBe(0);
    expect(reassembler.bufferedBytes).toBe(0);
  });
});
