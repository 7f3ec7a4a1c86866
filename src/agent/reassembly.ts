import type { CloseReason } from '../protocol/messages.js';
import { TcpFlag, type FlowEndpoints, type TapSegment } from './segment.js';

export interface ConnectionOpened extends FlowEndpoints {
  id: number;
  midStream: boolean;
}

/**
 * Receives the reassembled streams. Calls are synchronous from inside `push` and `sweep`; a
 * sink must not throw and must not call back into the Reassembler from them.
 */
export interface ReassemblySink {
  opened(connection: ConnectionOpened): void;
  /** In order, no gaps, no duplicates. In-order bytes are the tap's buffer, not a copy. */
  data(id: number, bytes: Buffer): void;
  /** `gapBytes` > 0 only for 'broken', when the size of the missing run is known. */
  closed(id: number, reason: CloseReason, gapBytes: number): void;
}

export interface ReassemblyLimits {
  maxBufferedPerConnection: number;
  maxBufferedTotal: number;
  idleTimeoutMs: number;
  holeTimeoutMs: number;
  maxConnections: number;
}

const DEFAULT_REASSEMBLY_LIMITS: Readonly<ReassemblyLimits> = Object.freeze({
  maxBufferedPerConnection: 4 * 1024 * 1024,
  maxBufferedTotal: 64 * 1024 * 1024,
  idleTimeoutMs: 120_000,
  // Linux backs its retransmission timeout off from 200 ms; 10 s leaves room for several tries.
  holeTimeoutMs: 10_000,
  maxConnections: 100_000,
});

/**
 * How long a closed key silences non-SYN segments. 60 s is Linux's TIME_WAIT: within it the
 * client cannot start a new connection on the same tuple without a SYN (which is always let
 * through), so the only thing silenced is late retransmits of the old one.
 */
const CLOSED_MEMORY_MS = 60_000;

const CONTROL = TcpFlag.SYN | TcpFlag.FIN | TcpFlag.RST;

class Held {
  constructor(
    /** Stream offset of bytes[0] (bytes since the connection's start, not a sequence number). */
    readonly off: number,
    readonly bytes: Buffer,
  ) {}
}

class Connection {
  /** ISN when the SYN was seen; undefined for a mid-stream join until a matching SYN shows up. */
  isn: number | undefined;
  /** Sequence number of the next byte to deliver, uint32. */
  nextSeq: number;
  /**
   * Bytes delivered so far. Held segments and the FIN are placed by stream offset (a plain
   * number that never wraps), so wrap-around only matters when a segment's seq is compared
   * with nextSeq.
   */
  delivered = 0;
  finOffset = Infinity;
  /** Sorted by offset, non-overlapping. */
  held: Held[] = [];
  heldBytes = 0;
  /** Set while bytes or a FIN wait behind a hole; the connection is then in `holey`. */
  holeSince: number | undefined = undefined;
  lastSeen: number;
  /** Links of the idle list, least recently seen first. */
  older: Connection | undefined = undefined;
  newer: Connection | undefined = undefined;

  constructor(
    readonly id: number,
    readonly key: string,
    readonly startSeq: number,
    isn: number | undefined,
    now: number,
  ) {
    this.isn = isn;
    this.nextSeq = startSeq;
    this.lastSeen = now;
  }

  /** Stream offset of the first byte (or FIN) waiting behind the hole, Infinity if none. */
  firstPending(): number {
    const first = this.held[0];
    return first === undefined ? this.finOffset : Math.min(first.off, this.finOffset);
  }
}

interface ClosedKey {
  at: number;
  isn: number | undefined;
  /**
   * Closed by the agent (broken, expired), not by the client: what the client still sends on it
   * is stream data the agent drops, not late copies of what it already took.
   */
  gaveUp: boolean;
}

/** Turns client→server tap segments into one ordered byte stream per connection. */
export class Reassembler {
  private readonly limits: ReassemblyLimits;
  private readonly connections = new Map<string, Connection>();
  /**
   * Connections with a hole. Kept apart so `sweep` visits only them: with 100k connections,
   * the few that lost a segment are all it needs to look at for hole timeouts.
   */
  private readonly holey = new Set<Connection>();
  /** Map order is insertion order, and entries are re-inserted when refreshed: oldest first. */
  private readonly closedKeys = new Map<string, ClosedKey>();
  /**
   * Every push moves its connection to the newest end (a few pointer writes), so idle expiry
   * and eviction only ever look at the oldest end instead of scanning the table.
   */
  private oldest: Connection | undefined = undefined;
  private newest: Connection | undefined = undefined;
  private nextId = 1;
  private heldTotal = 0;
  private now = 0;
  /**
   * Every payload byte pushed is counted once: `pushedBytes = deliveredBytes + ignoredBytes +
   * droppedBytes + bufferedBytes` at any moment (see Counters for what each means).
   */
  private pushed = 0;
  private delivered = 0;
  private ignored = 0;
  private dropped = 0;

  constructor(
    private readonly sink: ReassemblySink,
    limits: Partial<ReassemblyLimits> = {},
  ) {
    this.limits = { ...DEFAULT_REASSEMBLY_LIMITS };
    for (const name of Object.keys(this.limits) as (keyof ReassemblyLimits)[]) {
      const value = limits[name];
      if (value === undefined) continue;
      if (!(value > 0)) throw new RangeError(`reassembly limit ${name} must be > 0, got ${value}`);
      this.limits[name] = value;
    }
  }

  get bufferedBytes(): number {
    return this.heldTotal;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Payload bytes of every segment pushed. */
  get pushedBytes(): number {
    return this.pushed;
  }

  /** Bytes handed to the sink as stream data. */
  get deliveredBytes(): number {
    return this.delivered;
  }

  /** Bytes that are no part of any stream: copies of bytes already taken, past a FIN, RST text. */
  get ignoredBytes(): number {
    return this.ignored;
  }

  /** Stream bytes thrown away: held behind a hole when their connection was given up or reset. */
  get droppedBytes(): number {
    return this.dropped;
  }

  push(segment: TapSegment, nowMs: number): void {
    this.now = nowMs;
    this.pushed += segment.payload.length;
    const conn = this.connections.get(segment.flowKey);
    if (conn !== undefined && (segment.flags & CONTROL) === 0) {
      this.touch(conn, nowMs);
      this.data(conn, segment.seq, segment.payload);
      return;
    }
    this.pushControl(segment, conn, nowMs);
  }

  sweep(nowMs: number): void {
    this.now = nowMs;
    const idle = this.limits.idleTimeoutMs;
    while (this.oldest !== undefined && nowMs - this.oldest.lastSeen >= idle) {
      this.abandon(this.oldest);
    }
    const holeTimeout = this.limits.holeTimeoutMs;
    for (const conn of this.holey) {
      if (conn.holeSince !== undefined && nowMs - conn.holeSince >= holeTimeout) {
        this.close(conn, 'broken', conn.firstPending() - conn.delivered, true);
      }
    }
    for (const [key, closed] of this.closedKeys) {
      if (nowMs - closed.at < CLOSED_MEMORY_MS) break;
      this.closedKeys.delete(key);
    }
  }

  private pushControl(segment: TapSegment, found: Connection | undefined, nowMs: number): void {
    const { flowKey, seq, flags, payload } = segment;
    let conn = found;
    if ((flags & TcpFlag.RST) !== 0) {
      // RST payload is diagnostic text, never stream data. An RST for an unknown key has
      // nothing to close.
      this.ignored += payload.length;
      if (conn !== undefined) this.close(conn, 'rst', 0, true);
      else this.refreshClosed(flowKey);
      return;
    }
    let dataSeq = seq;
    if ((flags & TcpFlag.SYN) !== 0) {
      dataSeq = (seq + 1) >>> 0;
      if (conn === undefined) {
        const closed = this.closedKeys.get(flowKey);
        if (closed !== undefined && closed.isn === seq) {
          this.refreshClosed(flowKey);
          this.ignored += payload.length; // a retransmitted SYN of a connection already over
          return;
        }
        this.closedKeys.delete(flowKey);
        conn = this.open(segment, dataSeq, seq, nowMs);
      } else if (conn.isn === undefined && conn.startSeq === dataSeq) {
        // The tap reordered a new connection's SYN behind its first data: same stream.
        conn.isn = seq;
      } else if (conn.isn !== seq) {
        // Tuple reuse. Not remembered as closed: the key is taken again at once.
        this.abandon(conn, false);
        conn = this.open(segment, dataSeq, seq, nowMs);
      }
    } else if (conn === undefined) {
      // A late retransmit of a closed connection must not start a bogus mid-stream one, and a
      // bare FIN carries nothing worth opening a connection for.
      const closed = this.refreshClosed(flowKey);
      if (closed !== undefined) {
        if (closed.gaveUp) this.dropped += payload.length;
        else this.ignored += payload.length;
        return;
      }
      if (payload.length === 0) return;
      conn = this.open(segment, seq, undefined, nowMs);
    }
    this.touch(conn, nowMs);
    this.data(conn, dataSeq, payload);
    if ((flags & TcpFlag.FIN) !== 0 && this.connections.get(flowKey) === conn) {
      this.fin(conn, (dataSeq + payload.length) >>> 0);
    }
  }

  private open(
    segment: TapSegment,
    startSeq: number,
    isn: number | undefined,
    nowMs: number,
  ): Connection {
    if (this.connections.size >= this.limits.maxConnections && this.oldest !== undefined) {
      this.abandon(this.oldest);
    }
    const conn = new Connection(this.nextId++, segment.flowKey, startSeq, isn, nowMs);
    this.connections.set(conn.key, conn);
    this.sink.opened({ ...segment.endpoints(), id: conn.id, midStream: isn === undefined });
    return conn;
  }

  private data(conn: Connection, seq: number, payload: Buffer): void {
    let rel = (seq - conn.nextSeq) | 0;
    let bytes = payload;
    if (rel < 0) {
      if (-rel >= bytes.length) {
        this.ignored += bytes.length;
        return;
      }
      this.ignored += -rel;
      bytes = bytes.subarray(-rel);
      rel = 0;
    }
    const off = conn.delivered + rel;
    const room = conn.finOffset - off;
    if (room <= 0 || bytes.length === 0) {
      this.ignored += bytes.length;
      return;
    }
    if (bytes.length > room) {
      this.ignored += bytes.length - room;
      bytes = bytes.subarray(0, room);
    }
    if (rel !== 0) {
      this.hold(conn, off, bytes);
      return;
    }
    this.deliver(conn, bytes);
    if (conn.holeSince !== undefined) this.advanced(conn);
  }

  private deliver(conn: Connection, bytes: Buffer): void {
    conn.nextSeq = (conn.nextSeq + bytes.length) >>> 0;
    conn.delivered += bytes.length;
    this.delivered += bytes.length;
    this.sink.data(conn.id, bytes);
  }

  /** After the stream moved forward while something waited behind a hole. */
  private advanced(conn: Connection): void {
    const { held } = conn;
    let used = 0;
    for (const h of held) {
      if (h.off > conn.delivered) break;
      const skip = conn.delivered - h.off;
      if (skip < h.bytes.length) this.deliver(conn, skip === 0 ? h.bytes : h.bytes.subarray(skip));
      // What a later segment already delivered.
      this.ignored += Math.min(skip, h.bytes.length);
      conn.heldBytes -= h.bytes.length;
      this.heldTotal -= h.bytes.length;
      used++;
    }
    if (used > 0) held.splice(0, used);
    if (conn.delivered >= conn.finOffset) {
      this.close(conn, 'fin', 0, true);
    } else if (held.length > 0 || conn.finOffset !== Infinity) {
      // Progress proves the sender is still retransmitting: the timeout is for a stall, not for
      // a long recovery.
      conn.holeSince = this.now;
    } else {
      conn.holeSince = undefined;
      this.holey.delete(conn);
    }
  }

  private hold(conn: Connection, off: number, bytes: Buffer): void {
    const { held } = conn;
    const end = off + bytes.length;
    // First held segment ending after `off`; everything before it is entirely earlier.
    let lo = 0;
    let hi = held.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const h = held[mid]!;
      if (h.off + h.bytes.length <= off) lo = mid + 1;
      else hi = mid;
    }
    // Only the parts not already held are kept: first copy wins, so nothing is counted twice.
    const starts: number[] = [];
    const ends: number[] = [];
    const at: number[] = [];
    let added = 0;
    let cur = off;
    for (let i = lo; cur < end; i++) {
      const h = held[i];
      const stop = h === undefined ? end : Math.min(h.off, end);
      if (stop > cur) {
        starts.push(cur);
        ends.push(stop);
        at.push(i);
        added += stop - cur;
      }
      if (h === undefined) break;
      cur = Math.max(cur, h.off + h.bytes.length);
    }
    // Parts already held: copies.
    this.ignored += bytes.length - added;
    if (added === 0) return;
    if (
      conn.heldBytes + added > this.limits.maxBufferedPerConnection ||
      this.heldTotal + added > this.limits.maxBufferedTotal
    ) {
      const gap = Math.min(conn.firstPending(), off) - conn.delivered;
      this.dropped += added;
      this.close(conn, 'broken', gap, true);
      return;
    }
    for (let j = at.length - 1; j >= 0; j--) {
      const start = starts[j]!;
      // A copy: the payload usually views a ~1 MiB batch buffer that must not stay pinned.
      const copy = Buffer.from(bytes.subarray(start - off, ends[j]! - off));
      held.splice(at[j]!, 0, new Held(start, copy));
    }
    conn.heldBytes += added;
    this.heldTotal += added;
    this.markHole(conn);
  }

  private fin(conn: Connection, finSeq: number): void {
    // The first FIN defines the end; a retransmitted one names the same place.
    if (conn.finOffset !== Infinity) return;
    conn.finOffset = Math.max(conn.delivered, conn.delivered + ((finSeq - conn.nextSeq) | 0));
    if (conn.delivered === conn.finOffset) {
      this.close(conn, 'fin', 0, true);
      return;
    }
    const { held } = conn;
    let keep = held.length;
    while (keep > 0 && held[keep - 1]!.off >= conn.finOffset) keep--;
    // Bytes held past the FIN are no part of the stream.
    for (const h of held.splice(keep)) {
      conn.heldBytes -= h.bytes.length;
      this.heldTotal -= h.bytes.length;
      this.ignored += h.bytes.length;
    }
    const last = held[keep - 1];
    if (last !== undefined && last.off + last.bytes.length > conn.finOffset) {
      const cut = last.off + last.bytes.length - conn.finOffset;
      held[keep - 1] = new Held(last.off, last.bytes.subarray(0, last.bytes.length - cut));
      conn.heldBytes -= cut;
      this.heldTotal -= cut;
      this.ignored += cut;
    }
    this.markHole(conn);
  }

  private markHole(conn: Connection): void {
    if (conn.holeSince !== undefined) return;
    conn.holeSince = this.now;
    this.holey.add(conn);
  }

  /**
   * Closes a connection that stopped without FIN or RST (idle, evicted, tuple reused). When
   * bytes or a FIN were known to wait behind a hole, the stream is known to be incomplete, so
   * it is reported 'broken' with the hole's size rather than 'expired' (or 'fin', which would
   * claim the stream is whole).
   */
  private abandon(conn: Connection, remember = true): void {
    const gap = conn.firstPending() - conn.delivered;
    if (Number.isFinite(gap)) this.close(conn, 'broken', gap, remember);
    else this.close(conn, 'expired', 0, remember);
  }

  private close(conn: Connection, reason: CloseReason, gapBytes: number, remember: boolean): void {
    this.connections.delete(conn.key);
    this.unlink(conn);
    if (conn.holeSince !== undefined) this.holey.delete(conn);
    // Bytes waiting behind a hole are stream bytes the session will never get.
    this.dropped += conn.heldBytes;
    this.heldTotal -= conn.heldBytes;
    conn.heldBytes = 0;
    conn.held = [];
    if (remember) {
      this.closedKeys.delete(conn.key);
      const gaveUp = reason === 'broken' || reason === 'expired';
      this.closedKeys.set(conn.key, { at: this.now, isn: conn.isn, gaveUp });
      if (this.closedKeys.size > this.limits.maxConnections) {
        const oldestKey = this.closedKeys.keys().next().value;
        if (oldestKey !== undefined) this.closedKeys.delete(oldestKey);
      }
    }
    this.sink.closed(conn.id, reason, gapBytes);
  }

  /**
   * Segments of a closed key refresh its memory, so a connection given up on ('broken') stays
   * silent while its client keeps sending, rather than reappearing as a mid-stream join after
   * CLOSED_MEMORY_MS.
   */
  private refreshClosed(key: string): ClosedKey | undefined {
    const closed = this.closedKeys.get(key);
    if (closed === undefined) return undefined;
    this.closedKeys.delete(key);
    closed.at = this.now;
    this.closedKeys.set(key, closed);
    return closed;
  }

  private touch(conn: Connection, nowMs: number): void {
    conn.lastSeen = nowMs;
    if (this.newest === conn) return;
    this.unlink(conn);
    conn.older = this.newest;
    if (this.newest !== undefined) this.newest.newer = conn;
    else this.oldest = conn;
    this.newest = conn;
  }

  private unlink(conn: Connection): void {
    if (conn.older !== undefined) conn.older.newer = conn.newer;
    else if (this.oldest === conn) this.oldest = conn.newer;
    if (conn.newer !== undefined) conn.newer.older = conn.older;
    else if (this.newest === conn) this.newest = conn.older;
    conn.older = undefined;
    conn.newer = undefined;
  }
}
