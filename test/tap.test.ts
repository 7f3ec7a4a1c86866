import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Tap, TapError, type TapCounters } from '../src/agent/tap.js';
import { TcpFlag, type FlowEndpoints, type TapSegment } from '../src/agent/segment.js';
import { waitForTcp } from '../src/platform/local/netns.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';
import { waitFor } from './support/wait.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const CHILD = join(ROOT, 'test', 'support', 'tap-child.mjs');
const DROP_OBJ = join(ROOT, 'agent-bpf', '.output', 'drop.bpf.o');
const PORT = 8080;
const OTHER_PORT = 8081;
const TEST_RING_BYTES = 32 * 1024 * 1024;

// Reads each connection to the end and answers with the byte count, on every address.
const SERVER = `
const net = require('net');
for (const port of [${PORT}, ${OTHER_PORT}]) {
  net.createServer((s) => {
    let n = 0;
    s.on('data', (d) => { n += d.length; });
    s.on('end', () => s.end(String(n)));
    s.on('error', () => {});
  }).listen(port);
}`;

interface Copied {
  /** Arrival order. */
  index: number;
  flowKey: string;
  seq: number;
  flags: number;
  payload: Buffer;
  endpoints: FlowEndpoints;
}

class Collector {
  records: Copied[] = [];
  batches = 0;
  private waiters: { match: (r: Copied) => boolean; resolve: (r: Copied) => void }[] = [];

  onSegment(segment: TapSegment): void {
    const record = {
      index: this.records.length,
      flowKey: segment.flowKey,
      seq: segment.seq,
      flags: segment.flags,
      payload: Buffer.from(segment.payload), // the batch buffer is reused
      endpoints: segment.endpoints(),
    };
    this.records.push(record);
    this.waiters = this.waiters.filter((w) => !(w.match(record) && (w.resolve(record), true)));
  }

  onBatchEnd(): void {
    this.batches += 1;
  }

  of(clientPort: number, serverPort = PORT): Copied[] {
    return this.records.filter(
      (r) => r.endpoints.clientPort === clientPort && r.endpoints.serverPort === serverPort,
    );
  }

  /**
   * The FIN of the first connection opened from record `from` on: a FIN alone might still be
   * an earlier connection's, whose last records arrive late.
   */
  async finOfNext(from: number): Promise<Copied> {
    const syn = await this.waitFor((r) => r.index >= from && hasFlag(r, TcpFlag.SYN));
    return this.waitFor((r) => r.flowKey === syn.flowKey && hasFlag(r, TcpFlag.FIN));
  }

  waitFor(match: (r: Copied) => boolean, timeoutMs = 20_000): Promise<Copied> {
    const seen = this.records.find(match);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no such record arrived')), timeoutMs);
      this.waiters.push({
        match,
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
      });
    });
  }
}

const hasFlag = (r: { flags: number }, flag: number): boolean => (r.flags & flag) !== 0;

/** Places each payload at its sequence offset; fails on a hole or on disagreeing overlaps. */
function reassemble(records: Copied[]): Buffer {
  const syn = records.find((r) => hasFlag(r, TcpFlag.SYN));
  const fin = records.find((r) => hasFlag(r, TcpFlag.FIN));
  if (!syn || !fin) throw new Error('the connection was not seen from SYN to FIN');
  const start = (syn.seq + 1) >>> 0;
  const out = Buffer.alloc((fin.seq + fin.payload.length - start) >>> 0);
  const covered = new Uint8Array(out.length);
  for (const r of records) {
    const at = hasFlag(r, TcpFlag.SYN) ? 0 : (r.seq - start) >>> 0;
    for (let i = 0; i < r.payload.length; i++) {
      if (covered[at + i] && out[at + i] !== r.payload[i]) throw new Error(`overlap differs`);
    }
    r.payload.copy(out, at);
    covered.fill(1, at, at + r.payload.length);
  }
  const hole = covered.indexOf(0);
  if (hole >= 0) throw new Error(`byte ${hole} of ${out.length} was never copied`);
  return out;
}

function exited(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve) => child.once('exit', (code) => resolve(code)));
}

/** Sends a file over one TCP connection, by default from the client netns to the target. */
async function upload(
  sandbox: Sandbox,
  file: string,
  from = sandbox.client,
  address = sandbox.targetAddress,
): Promise<void> {
  const child = sandbox.spawn(from, 'bash', [
    '-c',
    `exec 3<>/dev/tcp/$1/${PORT}; cat "$0" >&3`,
    file,
    address,
  ]);
  expect(await exited(child)).toBe(0);
}

/** Sends `data` from the client netns with a known source port, so its records can be found. */
async function send(
  sandbox: Sandbox,
  netns: string,
  address: string,
  port: number,
  data: Buffer,
): Promise<number> {
  const script = `
const s = require('net').connect({ host: process.argv[1], port: +process.argv[2] }, () => {
  console.log(s.localPort);
  s.end(Buffer.from(process.argv[3], 'base64'));
});
s.resume();
s.on('close', () => process.exit(0));`;
  const child = sandbox.spawn(netns, 'node', [
    '-e',
    script,
    address,
    String(port),
    data.toString('base64'),
  ]);
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
  expect(await exited(child)).toBe(0);
  return Number(out.trim());
}

interface TcEntry {
  devname: string;
  ifindex: number;
  kind: string;
  name: string;
  id: number;
}

function tcEntries(sandbox: Sandbox): TcEntry[] {
  const json = JSON.parse(sandbox.run(sandbox.target, 'bpftool', ['-j', 'net', 'show'])) as {
    tc: TcEntry[];
  }[];
  return json.flatMap((section) => section.tc ?? []);
}

/** The BPF links that a process holds, as its fdinfo shows them. */
function linksOf(pid: number): { linkId: number; progId: number; ifindex: number; type: string }[] {
  const links = [];
  for (const fd of readdirSync(`/proc/${pid}/fdinfo`)) {
    let info: string;
    try {
      info = readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8');
    } catch {
      continue;
    }
    const field = (name: string) => new RegExp(`^${name}:\\s*(\\S+)`, 'm').exec(info)?.[1];
    if (!field('link_type')) continue;
    links.push({
      type: field('link_type') ?? '',
      linkId: Number(field('link_id')),
      progId: Number(field('prog_id')),
      ifindex: Number(field('ifindex')),
    });
  }
  return links;
}

/** Starts tap-child.mjs and resolves with its first line once it opened (or failed). */
async function startChild(
  args: string[],
  wrap: string[] = [],
): Promise<{ child: ChildProcess; result: Record<string, unknown> }> {
  const [command, ...rest] = [...wrap, process.execPath, CHILD, ...args];
  const child = spawn(command ?? '', rest, { stdio: ['ignore', 'pipe', 'inherit'] });
  const line = await new Promise<string>((resolve, reject) => {
    let out = '';
    child.stdout?.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('\n')) resolve(out.split('\n')[0] ?? '');
    });
    child.once('exit', () => reject(new Error(`tap-child exited early: ${out}`)));
  });
  return { child, result: JSON.parse(line) as Record<string, unknown> };
}

function delta(after: TapCounters, before: TapCounters): TapCounters {
  return {
    segmentsCopied: after.segmentsCopied - before.segmentsCopied,
    bytesCopied: after.bytesCopied - before.bytesCopied,
    segmentsDropped: after.segmentsDropped - before.segmentsDropped,
    bytesDropped: after.bytesDropped - before.bytesDropped,
  };
}

describe('tap', () => {
  let sandbox: Sandbox;
  let server: ChildProcess;
  let tap: Tap | undefined;
  const collector = new Collector();
  const children: ChildProcess[] = [];
  const scratch = mkdtempSync(join(tmpdir(), 'mirrord-test-tap-'));

  beforeAll(async () => {
    sandbox = createSandbox('tap');
    server = sandbox.spawn(sandbox.target, process.execPath, ['-e', SERVER]);
    await waitForTcp(sandbox.target, sandbox.targetAddress, PORT);
    await waitForTcp(sandbox.target, sandbox.targetAddress, OTHER_PORT);
    // The uploads below arrive at loopback speed, faster than any consumer drains: the ring must
    // hold what the consumer has not taken yet. 32 MiB holds the 20 MB one; the agent's default
    // (8 MiB, for its memory budget) plus the pool's 4 MiB would lose the rest, counted.
    tap = Tap.open({ netns: sandbox.target }, collector, { ringBufferBytes: TEST_RING_BYTES });
    tap.subscribe(PORT);
  });

  afterAll(() => {
    tap?.close();
    for (const child of children) child.kill('SIGKILL');
    sandbox?.destroy();
    rmSync(scratch, { recursive: true, force: true });
  });

  const theTap = (): Tap => {
    if (!tap) throw new Error('the tap did not open');
    return tap;
  };

  test('attaches with TCX to every interface of the namespace, lo included', () => {
    expect(theTap().attachMode).toBe('tcx');
    expect(
      theTap()
        .interfaces.map((i) => i.name)
        .sort(),
    ).toEqual(['eth0', 'lo']);
  });

  test('copies segments of a subscribed port and nothing of other ports', async () => {
    const data = Buffer.from('hello, mirrored world\n');
    const clientPort = await send(sandbox, sandbox.client, sandbox.targetAddress, PORT, data);
    const otherPort = await send(sandbox, sandbox.client, sandbox.targetAddress, OTHER_PORT, data);
    await collector.waitFor(
      (r) => r.endpoints.clientPort === clientPort && hasFlag(r, TcpFlag.FIN),
    );

    const records = collector.of(clientPort);
    expect(records[0]?.flags).toBe(TcpFlag.SYN);
    expect(Buffer.concat(records.map((r) => r.payload))).toEqual(data);
    expect(records.every((r) => r.flowKey === records[0]?.flowKey)).toBe(true);
    const eth0 = theTap().interfaces.find((i) => i.name === 'eth0');
    expect(records[0]?.endpoints).toEqual({
      family: 4,
      clientAddress: sandbox.clientAddress,
      clientPort,
      serverAddress: sandbox.targetAddress,
      serverPort: PORT,
      ifindex: eth0?.ifindex,
    });
    // Pure ACKs carry nothing for the reassembler and are skipped.
    expect(records.every((r) => r.payload.length > 0 || r.flags !== TcpFlag.ACK)).toBe(true);
    expect(collector.records.filter((r) => r.endpoints.clientPort === otherPort)).toEqual([]);
    expect(collector.records.every((r) => r.endpoints.serverPort === PORT)).toBe(true);
  });

  test('joins the records of a connection that continue each other, same bytes', async () => {
    // 300 small writes in quick bursts, each its own segment (TCP_NODELAY), on one connection.
    const before = theTap().counters();
    const clientPort = Number(
      await sandbox.runAsync(sandbox.client, process.execPath, [
        '-e',
        `const s = require('net').connect({ host: '${sandbox.targetAddress}', port: ${PORT}, noDelay: true }, async () => {
           for (let i = 0; i < 300; i++) {
             s.write('request ' + String(i).padStart(3, '0') + '\\n');
             if (i % 50 === 0) await new Promise((r) => setTimeout(r, 1));
           }
           console.log(s.localPort);
           s.end();
         });`,
      ]),
    );
    await collector.waitFor(
      (r) => r.endpoints.clientPort === clientPort && hasFlag(r, TcpFlag.FIN),
    );
    const records = collector.of(clientPort);
    const expected = Array.from(
      { length: 300 },
      (_, i) => `request ${String(i).padStart(3, '0')}\n`,
    );
    expect(reassemble(records).toString()).toBe(expected.join(''));
    const counted = delta(theTap().counters(), before);
    expect(counted.bytesCopied).toBe(expected.join('').length);
    // The kernel copied each write as a record; JavaScript got them joined per drain.
    expect(records.length).toBeLessThan(counted.segmentsCopied / 2);
  });

  test('a steady trickle wakes JavaScript once per lag budget, not once per segment', async () => {
    // One small write a millisecond, as a keep-alive client at a thousand requests a second
    // sends them. Each wakeup of JavaScript costs the target's node a context switch and more:
    // the consumer lets 5 ms of records gather before each drain (kMinPauseMillis).
    const writes = 300;
    const batchesBefore = collector.batches;
    const clientPort = Number(
      await sandbox.runAsync(sandbox.client, process.execPath, [
        '-e',
        `const s = require('net').connect({ host: '${sandbox.targetAddress}', port: ${PORT}, noDelay: true }, () => {
           let i = 0;
           const timer = setInterval(() => {
             s.write('tick ' + String(i).padStart(3, '0') + '\\n');
             if (++i === ${writes}) { clearInterval(timer); console.log(s.localPort); s.end(); }
           }, 1);
         });`,
      ]),
    );
    await collector.waitFor(
      (r) => r.endpoints.clientPort === clientPort && hasFlag(r, TcpFlag.FIN),
    );
    const expected = Array.from(
      { length: writes },
      (_, i) => `tick ${String(i).padStart(3, '0')}\n`,
    );
    expect(reassemble(collector.of(clientPort)).toString()).toBe(expected.join(''));
    // Draining at each record, or every millisecond, takes about one batch per write.
    expect(collector.batches - batchesBefore).toBeLessThan(writes / 2);
  });

  test('stops copying a port once unsubscribed', async () => {
    theTap().unsubscribe(PORT);
    let clientPort: number;
    try {
      const data = Buffer.from('not copied');
      clientPort = await send(sandbox, sandbox.client, sandbox.targetAddress, PORT, data);
    } finally {
      theTap().subscribe(PORT);
    }
    // The ring is in order: once a connection made after subscribing again has arrived, the
    // first one's segments would have arrived before it, had they been copied.
    const marker = await send(
      sandbox,
      sandbox.client,
      sandbox.targetAddress,
      PORT,
      Buffer.from('copied'),
    );
    await collector.waitFor((r) => r.endpoints.clientPort === marker && r.payload.length > 0);
    expect(collector.of(clientPort)).toEqual([]);
  });

  test('taps lo, over IPv4 and IPv6', async () => {
    const lo = theTap().interfaces.find((i) => i.name === 'lo');
    for (const [address, family] of [
      ['127.0.0.1', 4],
      ['::1', 6],
    ] as const) {
      const data = randomBytes(1000);
      const clientPort = await send(sandbox, sandbox.target, address, PORT, data);
      await collector.waitFor(
        (r) => r.endpoints.clientPort === clientPort && hasFlag(r, TcpFlag.FIN),
      );
      const records = collector.of(clientPort);
      expect(records[0]?.endpoints).toEqual({
        family,
        clientAddress: address,
        clientPort,
        serverAddress: address,
        serverPort: PORT,
        ifindex: lo?.ifindex,
      });
      expect(reassemble(records)).toEqual(data);
    }
  });

  test('paused, records wait in the ring; resumed, they arrive in order, whole', async () => {
    // 8 MiB: more than the 1 MiB batch buffer, less than the test's 32 MiB ring.
    const data = randomBytes(8 * 1024 * 1024);
    const file = join(scratch, 'paused-upload');
    writeFileSync(file, data);
    const before = theTap().counters();
    const firstRecord = collector.records.length;
    theTap().pause();
    try {
      await upload(sandbox, file);
      // The kernel copied it all (the counters say so) while nothing was handed over.
      await waitFor(
        'the kernel to copy the upload',
        () => delta(theTap().counters(), before).bytesCopied >= data.length,
        { ms: 10_000 },
      );
      expect(collector.records.length).toBe(firstRecord);
    } finally {
      theTap().resume();
    }
    const fin = await collector.finOfNext(firstRecord);
    const records = collector.records.slice(firstRecord).filter((r) => r.flowKey === fin.flowKey);
    expect(reassemble(records).equals(data)).toBe(true);
    expect(delta(theTap().counters(), before).bytesDropped).toBe(0);
  });

  test('a 20 MB upload is copied whole, and the counters add up', async () => {
    const data = randomBytes(20 * 1024 * 1024);
    const file = join(scratch, 'upload');
    writeFileSync(file, data);
    const before = theTap().counters();
    const firstRecord = collector.records.length;

    await upload(sandbox, file);
    const fin = await collector.finOfNext(firstRecord);
    const records = collector.records.slice(firstRecord).filter((r) => r.flowKey === fin.flowKey);
    expect(reassemble(records).equals(data)).toBe(true);
    // GSO/GRO: the veth hands over skbs far larger than one MTU.
    expect(Math.max(...records.map((r) => r.payload.length))).toBeGreaterThan(1500 * 4);

    // Records of the connection's end (a RST answering the server's late reply) may still be
    // on their way: wait until every counted record has arrived.
    const copied = () => collector.records.slice(firstRecord);
    const copiedBytes = () => copied().reduce((n, r) => n + r.payload.length, 0);
    await waitFor(
      'every record the kernel counted',
      () => delta(theTap().counters(), before).bytesCopied <= copiedBytes(),
      { ms: 5000, everyMs: 20 },
    );
    // Records that continue each other reach JavaScript joined: fewer, same bytes.
    const counted = delta(theTap().counters(), before);
    expect(counted).toMatchObject({
      bytesCopied: copiedBytes(),
      segmentsDropped: 0,
      bytesDropped: 0,
    });
    expect(counted.segmentsCopied).toBeGreaterThanOrEqual(copied().length);
    expect(collector.batches).toBeGreaterThan(0);
  });

  test('splits a BIG TCP skb larger than one record into several', async () => {
    const lo = (size: string) =>
      sandbox.run(sandbox.target, 'ip', [
        'link',
        'set',
        'lo',
        'gso_max_size',
        size,
        'gro_max_size',
        size,
      ]);
    lo('262144');
    try {
      const data = randomBytes(16 * 1024 * 1024);
      const file = join(scratch, 'big');
      writeFileSync(file, data);
      const firstRecord = collector.records.length;
      const before = theTap().counters();
      await upload(sandbox, file, sandbox.target, '::1');
      const fin = await collector.finOfNext(firstRecord);
      const records = collector.records.slice(firstRecord).filter((r) => r.flowKey === fin.flowKey);
      expect(reassemble(records).equals(data)).toBe(true);
      // Skbs of up to 256 KiB carried the upload and a record holds at most 64 KiB, so the
      // exact bytes above mean every skb was split whole; JavaScript sees the pieces joined
      // again, but the kernel counted each.
      expect(delta(theTap().counters(), before).segmentsCopied).toBeGreaterThanOrEqual(
        data.length / 65536,
      );
      expect(records.filter((r) => hasFlag(r, TcpFlag.SYN))).toHaveLength(1);
      expect(records.filter((r) => hasFlag(r, TcpFlag.FIN))).toHaveLength(1);
    } finally {
      lo('65536');
    }
  });

  test('when JavaScript falls behind, the kernel counts what it could not copy', async () => {
    const slow = new Collector();
    const pause = new Int32Array(new SharedArrayBuffer(4));
    const slowTap = Tap.open(
      { netns: sandbox.target },
      {
        onSegment: (segment) => slow.onSegment(segment),
        // Blocks the JavaScript thread, as a busy agent would.
        onBatchEnd: () => Atomics.wait(pause, 0, 0, 20),
      },
      { ringBufferBytes: 256 * 1024 },
    );
    try {
      slowTap.subscribe(PORT);
      const file = join(scratch, 'upload');
      writeFileSync(file, randomBytes(20 * 1024 * 1024));
      await upload(sandbox, file);
      // The FIN itself may have been dropped, so the wait is for the counters: every byte of
      // the upload copied or counted as dropped, and every copied byte handed over.
      const handedOver = () => slow.records.reduce((n, r) => n + r.payload.length, 0);
      const counters = await waitFor(
        'the upload to be copied or counted as dropped, and handed over',
        () => {
          const now = slowTap.counters();
          const whole = now.bytesCopied + now.bytesDropped >= 20 * 1024 * 1024;
          return whole && now.bytesCopied === handedOver() && now;
        },
        { ms: 10_000, everyMs: 20 },
      );
      expect(counters.segmentsDropped).toBeGreaterThan(0);
      expect(counters.segmentsCopied).toBeGreaterThanOrEqual(slow.records.length);
      expect(counters.bytesCopied).toBe(slow.records.reduce((n, r) => n + r.payload.length, 0));
      expect(counters.bytesCopied + counters.bytesDropped).toBeGreaterThanOrEqual(20 * 1024 * 1024);
    } finally {
      slowTap.close();
    }
  });

  test('copies retransmissions when segments are lost (drop.bpf.o)', async () => {
    const tc = (...args: string[]) => sandbox.run(sandbox.client, 'tc', args);
    tc('qdisc', 'add', 'dev', 'eth0', 'clsact');
    tc('filter', 'add', 'dev', 'eth0', 'egress', 'bpf', 'da', 'obj', DROP_OBJ, 'sec', 'tc');
    try {
      const data = randomBytes(4 * 1024 * 1024);
      const file = join(scratch, 'lossy');
      writeFileSync(file, data);
      const firstRecord = collector.records.length;
      await upload(sandbox, file);
      const fin = await collector.finOfNext(firstRecord);
      const records = collector.records.slice(firstRecord).filter((r) => r.flowKey === fin.flowKey);
      expect(reassemble(records).equals(data)).toBe(true);
      // A retransmitted segment arrives after segments that follow it.
      let highest = records[0]?.seq ?? 0;
      let late = 0;
      for (const r of records) {
        if (((r.seq - highest) | 0) < 0) late += 1;
        else highest = r.seq;
      }
      expect(late).toBeGreaterThan(0);
    } finally {
      tc('qdisc', 'del', 'dev', 'eth0', 'clsact');
    }
  });

  test('opens by PID, and names what is wrong with a bad target', () => {
    if (server.pid === undefined) throw new Error('no server pid');
    const byPid = Tap.open({ pid: server.pid }, collector);
    expect(byPid.interfaces.map((i) => i.name).sort()).toEqual(['eth0', 'lo']);
    byPid.close();
    byPid.close();

    const failure = (fn: () => unknown): TapError => {
      try {
        fn();
      } catch (error) {
        expect(error).toBeInstanceOf(TapError);
        return error as TapError;
      }
      throw new Error('did not throw');
    };
    const noPid = failure(() => Tap.open({ pid: 2 ** 22 + 1 }, collector));
    expect(noPid.code).toBe('NO_SUCH_PROCESS');
    expect(noPid.message).toBe(`no process with PID ${2 ** 22 + 1}`);
    const noNetns = failure(() => Tap.open({ netns: 'mirrord-test-tap-missing' }, collector));
    expect(noNetns.code).toBe('NO_SUCH_NETNS');
    expect(noNetns.message).toMatch(/no network namespace named mirrord-test-tap-missing/);
    const badRing = failure(() =>
      Tap.open({ netns: sandbox.target }, collector, { ringBufferBytes: 3 << 20 }),
    );
    expect(badRing.code).toBe('BAD_ARGUMENT');
  });

  test('without privileges, says what is needed', async () => {
    const { child, result } = await startChild(
      [JSON.stringify({ netns: sandbox.target }), 'auto'],
      ['setpriv', '--inh-caps=-all', '--bounding-set=-all', '--'],
    );
    children.push(child);
    expect(result.error).toEqual({
      code: 'NO_PRIVILEGE',
      message: expect.stringMatching(/needs root or CAP_BPF\+CAP_NET_ADMIN/),
    });
  });

  test('a SIGKILLed agent leaves no TCX link behind', async () => {
    const { child, result } = await startChild([JSON.stringify({ netns: sandbox.target }), 'tcx']);
    children.push(child);
    expect(result.attachMode).toBe('tcx');
    if (child.pid === undefined) throw new Error('no child pid');
    const links = linksOf(child.pid);
    expect(links.map((l) => [l.type, l.ifindex]).sort()).toEqual(
      theTap()
        .interfaces.map((i) => ['tcx', i.ifindex])
        .sort(),
    );

    child.kill('SIGKILL');
    await exited(child);
    const live = JSON.parse(execFileSync('bpftool', ['-j', 'link', 'show'], { encoding: 'utf8' }));
    const liveIds = new Set((live as { id: number }[]).map((l) => l.id));
    expect(links.filter((l) => liveIds.has(l.linkId))).toEqual([]);
    for (const { progId } of links) {
      expect(() =>
        execFileSync('bpftool', ['prog', 'show', 'id', String(progId)], { stdio: 'ignore' }),
      ).toThrow();
    }
    expect(tcEntries(sandbox)).toEqual([]);
  });

  test('in tc mode, the next open replaces the filters of a SIGKILLed agent', async () => {
    const { child, result } = await startChild([JSON.stringify({ netns: sandbox.target }), 'tc']);
    children.push(child);
    expect(result.attachMode).toBe('tc');
    child.kill('SIGKILL');
    await exited(child);
    const stale = tcEntries(sandbox);
    expect(stale.map((e) => e.devname).sort()).toEqual(['eth0', 'lo']);

    const legacy = new Collector();
    const tcTap = Tap.open({ netns: sandbox.target }, legacy, { attachMode: 'tc' });
    try {
      expect(tcTap.attachMode).toBe('tc');
      const fresh = tcEntries(sandbox);
      expect(fresh.map((e) => e.devname).sort()).toEqual(['eth0', 'lo']);
      const staleIds = new Set(stale.map((e) => e.id));
      expect(fresh.filter((e) => staleIds.has(e.id))).toEqual([]);

      // The TCX tap passes packets on (TCX_NEXT), so the tc filter behind it sees them too.
      tcTap.subscribe(PORT);
      const data = randomBytes(3000);
      const clientPort = await send(sandbox, sandbox.client, sandbox.targetAddress, PORT, data);
      const fin = (r: Copied) => r.endpoints.clientPort === clientPort && hasFlag(r, TcpFlag.FIN);
      await Promise.all([legacy.waitFor(fin), collector.waitFor(fin)]);
      expect(reassemble(legacy.of(clientPort))).toEqual(data);
      expect(reassemble(collector.of(clientPort))).toEqual(data);
    } finally {
      tcTap.close();
    }
    expect(tcEntries(sandbox)).toEqual([]);
  });

  test('close is idempotent and keeps the final counters', () => {
    const t = theTap();
    const final = t.counters();
    t.close();
    t.close();
    expect(t.counters()).toEqual(final);
    expect(() => t.subscribe(PORT)).toThrow(TapError);
    tap = undefined;
  });
});
