import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import type { FlowEndpoints, TapSegment } from './segment.js';
import { packageRoot } from '../package-root.js';

export type TapNetns = { pid: number } | { netns: string };

export interface TapOptions {
  /** Size of the BPF ring buffer: a power of 2 from 256 KiB to 1 GiB. Default 8 MiB. */
  ringBufferBytes?: number;
  /**
   * 'tcx' uses TCX links (Linux 6.6+), which vanish with the process; 'tc' uses a legacy clsact
   * filter, which a killed agent leaves behind until the next open replaces it. 'auto' (default)
   * prefers tcx.
   */
  attachMode?: 'auto' | 'tcx' | 'tc';
}

export interface TapInterface {
  ifindex: number;
  name: string;
}

/** Summed over CPUs. A skb larger than one record (64 KiB of payload) counts once per record. */
export interface TapCounters {
  segmentsCopied: number;
  bytesCopied: number;
  /** Segments the ring buffer had no room for: JavaScript did not keep up. */
  segmentsDropped: number;
  bytesDropped: number;
}

export interface TapHandlers {
  /**
   * `segment.payload` is a view into a buffer that is refilled once the batch's onBatchEnd has
   * returned: copy whatever must outlive the batch. Called on the loop's own turn, never from
   * inside a call into the tap.
   */
  onSegment(segment: TapSegment): void;
  /** Called after the last segment of each batch: a good time to flush work queued per segment. */
  onBatchEnd?(): void;
}

/**
 * `code` is one of: NO_SUCH_PROCESS, NO_SUCH_NETNS, BAD_TARGET, NO_PRIVILEGE, NO_BPF, NO_RINGBUF,
 * NO_TCX, NO_INTERFACES, BPF_FAILED, BAD_ARGUMENT, CLOSED, NO_ADDON, SCHED_FAILED.
 */
export class TapError extends Error {
  override name = 'TapError';
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

interface NativeHandle {
  readonly attachMode: 'tcx' | 'tc';
  readonly interfaces: TapInterface[];
  subscribe(port: number): void;
  unsubscribe(port: number): void;
  counters(): [number, number, number, number];
  pause(): void;
  resume(): void;
  close(): void;
}

interface NativeModule {
  deferToTarget(): number;
  open(
    target: TapNetns,
    onBatch: (length: number) => void,
    ringBufferBytes: number,
    attachMode: string,
    batch: Buffer,
  ): NativeHandle;
}

/**
 * The fields of a record's header, agent-bpf/tap.h's struct tap_record: byte offset and size,
 * padding included, so that the fields cover the header exactly. test/record-layout.test.ts
 * compiles tap.h and checks every field, the header's size and that coverage: a field changed or
 * added on one side only fails it.
 */
export const TAP_RECORD_FIELDS = {
  timestamp_ns: { offset: 0, size: 8 },
  seq: { offset: 8, size: 4 },
  ifindex: { offset: 12, size: 4 },
  payload_len: { offset: 16, size: 4 },
  sport: { offset: 20, size: 2 },
  dport: { offset: 22, size: 2 },
  family: { offset: 24, size: 1 },
  flags: { offset: 25, size: 1 },
  pad: { offset: 26, size: 6 },
  saddr: { offset: 32, size: 16 },
  daddr: { offset: 48, size: 16 },
} as const;
/** sizeof(struct tap_record): where the payload starts. */
export const TAP_RECORD_HEADER_BYTES = 64;
/** TAP_RECORD_ALIGN: each record of a batch starts at a multiple of it. */
export const TAP_RECORD_ALIGN = 8;

// Short names for the parsing below.
const HEADER = TAP_RECORD_HEADER_BYTES;
const ALIGN_MASK = TAP_RECORD_ALIGN - 1;
const OFF_TIMESTAMP = TAP_RECORD_FIELDS.timestamp_ns.offset;
const OFF_SEQ = TAP_RECORD_FIELDS.seq.offset;
const OFF_IFINDEX = TAP_RECORD_FIELDS.ifindex.offset;
const OFF_LEN = TAP_RECORD_FIELDS.payload_len.offset;
const OFF_SPORT = TAP_RECORD_FIELDS.sport.offset;
const OFF_DPORT = TAP_RECORD_FIELDS.dport.offset;
const OFF_FAMILY = TAP_RECORD_FIELDS.family.offset;
const OFF_FLAGS = TAP_RECORD_FIELDS.flags.offset;
const OFF_SADDR = TAP_RECORD_FIELDS.saddr.offset;
const OFF_DADDR = TAP_RECORD_FIELDS.daddr.offset;

const DEFAULT_RING_BYTES = 8 * 1024 * 1024;
/** The buffer the addon writes each batch into; a drain larger than it comes as several. */
const BATCH_BYTES = 1024 * 1024;

let native: NativeModule | undefined;

function loadNative(): NativeModule {
  if (native) return native;
  const path = join(packageRoot(), 'build', 'Release', 'mirrord_tap.node');
  if (!existsSync(path)) {
    throw new TapError('NO_ADDON', `the tap addon is not built (${path}); run npm run build`);
  }
  native = createRequire(import.meta.url)(path) as NativeModule;
  return native;
}

// Not `instanceof Error`: errors made by the addon belong to the main realm, which is not the
// realm of code running in a vm context (jest).
function asTapError(error: unknown): unknown {
  const { code, message } = (error ?? {}) as { code?: unknown; message?: unknown };
  return typeof code === 'string' && typeof message === 'string'
    ? new TapError(code, message)
    : error;
}

function formatIpv6(b: Buffer, at: number): string {
  const groups = [];
  for (let i = 0; i < 16; i += 2) groups.push(b.readUInt16BE(at + i).toString(16));
  // The URL parser writes IPv6 hosts in the canonical short form (RFC 5952 "::" compression).
  return new URL(`http://[${groups.join(':')}]/`).hostname.slice(1, -1);
}

function formatAddress(family: 4 | 6, b: Buffer, at: number): string {
  return family === 4 ? `${b[at]}.${b[at + 1]}.${b[at + 2]}.${b[at + 3]}` : formatIpv6(b, at);
}

// IPv4 addresses as numbers: cheaper than text, and the key only needs to be unique.
function flowKeyAt(b: Buffer, at: number): string {
  const sport = b.readUInt16LE(at + OFF_SPORT);
  const dport = b.readUInt16LE(at + OFF_DPORT);
  if (b[at + OFF_FAMILY] === 4) {
    return `${b.readUInt32BE(at + OFF_SADDR)}:${sport}>${b.readUInt32BE(at + OFF_DADDR)}:${dport}`;
  }
  const saddr = b.toString('hex', at + OFF_SADDR, at + OFF_SADDR + 16);
  const daddr = b.toString('hex', at + OFF_DADDR, at + OFF_DADDR + 16);
  return `${saddr}:${sport}>${daddr}:${dport}`;
}

class Segment implements TapSegment {
  constructor(
    public flowKey: string,
    public seq: number,
    public flags: number,
    public payload: Buffer,
    public tapMicros: number,
    private readonly batch: Buffer,
    private readonly at: number,
  ) {}

  endpoints(): FlowEndpoints {
    const b = this.batch;
    const at = this.at;
    const family = b[at + OFF_FAMILY] === 6 ? 6 : 4;
    return {
      family,
      clientAddress: formatAddress(family, b, at + OFF_SADDR),
      clientPort: b.readUInt16LE(at + OFF_SPORT),
      serverAddress: formatAddress(family, b, at + OFF_DADDR),
      serverPort: b.readUInt16LE(at + OFF_DPORT),
      ifindex: b.readUInt32LE(at + OFF_IFINDEX),
    };
  }
}

/**
 * Puts every thread of this process, and those it starts later, under SCHED_BATCH, so that its
 * wakeups do not preempt the target it shares a node with: it runs when the target blocks or
 * its time slice ends, with an ordinary task's share of the CPU (a lower priority starved it on
 * a busy node, and it lost data). Call it early: a thread started later inherits the policy of
 * the thread that started it.
 */
export function deferToTarget(): void {
  try {
    loadNative().deferToTarget();
  } catch (error) {
    throw asTapError(error);
  }
}

const openTaps = new Set<Tap>();

// TCX links vanish with the process, but legacy tc filters must be removed while we still can.
function closeAllOnExit(): void {
  for (const tap of openTaps) tap.close();
}

/**
 * Copies client→server TCP segments of subscribed ports that arrive in a network namespace. An
 * open tap keeps the process alive until close().
 */
export class Tap {
  private closed = false;
  private finalCounters: TapCounters | undefined;
  private readonly native: NativeHandle;
  /** The buffer the addon writes each batch into, valid until the batch's handlers return. */
  private readonly batch = Buffer.alloc(BATCH_BYTES);

  readonly interfaces: TapInterface[];
  readonly attachMode: 'tcx' | 'tc';

  private constructor(
    target: TapNetns,
    private readonly handlers: TapHandlers,
    options: TapOptions,
  ) {
    const mod = loadNative();
    try {
      this.native = mod.open(
        target,
        (length) => this.onBatch(length),
        options.ringBufferBytes ?? DEFAULT_RING_BYTES,
        options.attachMode ?? 'auto',
        this.batch,
      );
    } catch (error) {
      throw asTapError(error);
    }
    this.interfaces = this.native.interfaces;
    this.attachMode = this.native.attachMode;
  }

  /** Loads the tap and attaches it to every interface of the target's network namespace. */
  static open(target: TapNetns, handlers: TapHandlers, options: TapOptions = {}): Tap {
    const tap = new Tap(target, handlers, options);
    if (openTaps.size === 0) process.once('exit', closeAllOnExit);
    openTaps.add(tap);
    return tap;
  }

  subscribe(port: number): void {
    try {
      this.native.subscribe(port);
    } catch (error) {
      throw asTapError(error);
    }
  }

  unsubscribe(port: number): void {
    try {
      this.native.unsubscribe(port);
    } catch (error) {
      throw asTapError(error);
    }
  }

  /**
   * Stops handing batches to the handlers (within a batch's handlers: after that batch). The
   * addon stops draining, the ring buffer takes what follows, and only when that is full does
   * the kernel count segments it could not copy.
   */
  pause(): void {
    if (!this.closed) this.native.pause();
  }

  /** Goes on at the loop's next turn, with what was drained and not yet handed over first. */
  resume(): void {
    if (!this.closed) this.native.resume();
  }

  /** After close(), the values at the time of closing. */
  counters(): TapCounters {
    if (this.finalCounters) return this.finalCounters;
    const [segmentsCopied, bytesCopied, segmentsDropped, bytesDropped] = this.native.counters();
    return { segmentsCopied, bytesCopied, segmentsDropped, bytesDropped };
  }

  close(): void {
    if (this.closed) return;
    this.finalCounters = this.counters();
    this.closed = true;
    this.native.close();
    openTaps.delete(this);
    if (openTaps.size === 0) process.removeListener('exit', closeAllOnExit);
  }

  private onBatch(length: number): void {
    try {
      this.deliver(this.batch.subarray(0, length));
    } catch (error) {
      // Thrown again outside of the addon's call, a handler's bug fails the process like any
      // uncaught exception, and the addon's drain is not left half done.
      process.nextTick(() => {
        throw error;
      });
    }
  }

  private deliver(batch: Buffer): void {
    const { onSegment, onBatchEnd } = this.handlers;
    const end = batch.length;
    let at = 0;
    while (at < end && !this.closed) {
      const len = batch.readUInt32LE(at + OFF_LEN);
      const segment = new Segment(
        flowKeyAt(batch, at),
        batch.readUInt32LE(at + OFF_SEQ),
        batch[at + OFF_FLAGS] ?? 0,
        batch.subarray(at + HEADER, at + HEADER + len),
        // Two u32 reads rather than a BigInt per segment; the double's rounding at this size
        // (hundreds of ns at most) is far below a microsecond.
        Math.floor(
          (batch.readUInt32LE(at + OFF_TIMESTAMP + 4) * 2 ** 32 +
            batch.readUInt32LE(at + OFF_TIMESTAMP)) /
            1000,
        ),
        batch,
        at,
      );
      onSegment.call(this.handlers, segment);
      at += (HEADER + len + ALIGN_MASK) & ~ALIGN_MASK;
    }
    if (!this.closed) onBatchEnd?.call(this.handlers);
  }
}
