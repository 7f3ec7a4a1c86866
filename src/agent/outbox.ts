import type { CloseReason } from '../protocol/messages.js';

/** The part of a session the outbox writes to. */
export interface OutboxSession {
  sendData(id: number, bytes: Buffer, tapMicros: number): void;
  sendClosed(id: number, reason: CloseReason, gapBytes: number): void;
  /** Bytes written and not yet taken by the client. */
  readonly backlogBytes: number;
}

/** A connection's bytes gathered in one batch; the stamp is the earliest, the lag's start. */
interface Pending {
  chunks: Buffer[];
  tapMicros: number;
}

/** Below this average chunk size, joining a connection's chunks beats one message per chunk. */
const JOIN_BELOW_BYTES = 4096;

/**
 * Holds each connection's reassembled bytes until the end of a tap batch and sends them as one
 * data message per connection: a keep-alive HTTP connection under load yields dozens of small
 * requests per batch, and one message instead of dozens is what keeps the agent's per-request
 * cost low. It is also where a session that cannot keep up costs whole connections, reported
 * as broken, rather than unbounded memory or corrupted streams.
 */
export class Outbox {
  readonly #pending = new Map<number, Pending>();
  readonly #dropped = new Set<number>();
  readonly #maxBacklogBytes: number;
  /**
   * Connections the agent gave up on, and the bytes it was given and could not send. Every
   * byte given to data() is sent (`sentBytes`), dropped, or pending (`pendingBytes`).
   */
  readonly drops = { connections: 0, bytes: 0 };
  #sent = 0;
  #pendingBytes = 0;

  constructor(maxBacklogBytes: number) {
    this.#maxBacklogBytes = maxBacklogBytes;
  }

  /** Bytes sent in data messages. */
  get sentBytes(): number {
    return this.#sent;
  }

  /** Bytes gathered for the end of the batch. */
  get pendingBytes(): number {
    return this.#pendingBytes;
  }

  /**
   * `bytes` may be a view into the tap's batch: it is sent (copied) by the batch's flush().
   * `tapMicros`: when the tap saw the segment that completed them.
   */
  data(id: number, bytes: Buffer, tapMicros: number): void {
    if (this.#dropped.has(id)) {
      this.drops.bytes += bytes.length;
      return;
    }
    this.#pendingBytes += bytes.length;
    const pending = this.#pending.get(id);
    if (pending) pending.chunks.push(bytes);
    else this.#pending.set(id, { chunks: [bytes], tapMicros });
  }

  closed(session: OutboxSession, id: number, reason: CloseReason, gapBytes: number): void {
    this.#send(session, id);
    if (this.#dropped.delete(id)) return;
    // The gap's bytes were never copied: they are no drop of the agent's (see Counters).
    if (reason === 'broken') this.drops.connections += 1;
    session.sendClosed(id, reason, gapBytes);
  }

  /** Sends what the batch gathered. */
  flush(session: OutboxSession): void {
    for (const id of this.#pending.keys()) this.#send(session, id);
  }

  /** Forgets everything: the session is gone, and with it what was gathered for it. */
  clear(): void {
    this.drops.bytes += this.#pendingBytes;
    this.#pendingBytes = 0;
    this.#pending.clear();
    this.#dropped.clear();
  }

  /** Bytes of a stream that no session is there to take. */
  discard(bytes: number): void {
    this.drops.bytes += bytes;
  }

  #send(session: OutboxSession, id: number): void {
    const pending = this.#pending.get(id);
    if (!pending) return;
    this.#pending.delete(id);
    const { chunks, tapMicros } = pending;
    let total = 0;
    for (const chunk of chunks) total += chunk.length;
    this.#pendingBytes -= total;
    if (session.backlogBytes > this.#maxBacklogBytes) {
      this.#dropped.add(id);
      this.drops.connections += 1;
      this.drops.bytes += total;
      session.sendClosed(id, 'broken', total);
      return;
    }
    this.#sent += total;
    if (chunks.length > 1 && total / chunks.length < JOIN_BELOW_BYTES) {
      session.sendData(id, Buffer.concat(chunks, total), tapMicros);
    } else {
      // The oldest stamp for all: the lag is the first byte's.
      for (const chunk of chunks) session.sendData(id, chunk, tapMicros);
    }
  }
}
