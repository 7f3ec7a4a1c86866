/**
 * The local ends of a session's streams (see StreamMessage), the same at both ends: each joins a
 * socket here to its peer's at the other end of the session. What a TCP socket reads goes out
 * as `streamData`, what comes in is written to it; its FIN travels as `streamEnd` (so a
 * half-closed connection stays half-closed), a failure as `streamReset` (the peer resets its
 * socket: the app sees ECONNRESET, as it would have). Flow control is per stream and end to
 * end: a sender stops reading its socket while a window of its bytes is not yet credited by the
 * receiver, who credits them once its socket took them. So a slow reader holds back its own
 * stream only, and the session's memory for a stream is bounded by the window. A datagram
 * stream (UDP) keeps each datagram whole and takes no credit: a datagram that meets a session
 * that is behind is dropped, as a network would, and counted.
 */
import type net from 'node:net';
import type { StreamMessage } from './messages.js';

/** The session, as its streams use it (AgentSession's or AgentClient's stream methods). */
export interface StreamSession {
  sendStream(message: StreamMessage): void;
  /** The session's own socket is behind: streams stop reading their sockets until it drains. */
  readonly streamsBehind: boolean;
  onceDrained(listener: () => void): void;
}

/**
 * Bytes uncredited at which a sender stops reading its socket (so at most this and one read are
 * in flight per stream): enough for a local target's round trip at a
 * GB/s (the credit comes back within a millisecond), small enough that 500 streams' worst case
 * stays within half a GiB.
 */
export const STREAM_WINDOW_BYTES = 1024 * 1024;
/** Credit is sent once this much was written, or at the end of the event loop's turn. */
const CREDIT_BATCH_BYTES = 64 * 1024;

/** One stream's TCP end. */
interface SocketEnd {
  kind: 'socket';
  socket: net.Socket;
  /** Bytes sent and not yet credited. */
  uncredited: number;
  /** Bytes written to the socket and not yet credited to the peer. */
  credit: number;
  creditQueued: boolean;
  /** This side's socket ended (streamEnd sent) / the peer's did (socket.end() called). */
  readEnded: boolean;
  writeEnded: boolean;
  /** The stream is over for this end: nothing more is sent. */
  done: boolean;
}

/** One stream's datagram end: `deliver` sends a datagram that came from the peer. */
interface DatagramEnd {
  kind: 'datagrams';
  deliver(bytes: Buffer): void;
  close(): void;
}

/**
 * A stream whose socket is not here yet: the peer's socket may send before this end's joins
 * (a server that speaks first), at most a window of bytes, which wait here.
 */
interface PendingEnd {
  kind: 'pending';
  messages: StreamMessage[];
}

type End = SocketEnd | DatagramEnd | PendingEnd;

/** How often, at most, dropped datagrams are told (their total so far). */
const DROPS_TOLD_EVERY_MS = 1000;

export class Streams {
  readonly #session: StreamSession;
  readonly #ends = new Map<number, End>();
  #waitingForDrain = false;
  /** Datagrams this end dropped because the session was behind. */
  #datagramsDropped = 0;
  readonly #tellDrops: (total: number) => void;
  #dropsTimer: NodeJS.Timeout | undefined;

  /**
   * `tellDrops` gets the total of datagrams dropped here so far, at most once a second and
   * once more after the last: nothing is lost unseen.
   */
  constructor(session: StreamSession, tellDrops: (total: number) => void) {
    this.#session = session;
    this.#tellDrops = tellDrops;
  }

  /** Streams open now. */
  get size(): number {
    return this.#ends.size;
  }

  /** Stream `id` is being opened: what comes for it before its socket joins waits for it. */
  expect(id: number): void {
    this.#ends.set(id, { kind: 'pending', messages: [] });
  }

  /** Stream `id` was never opened (the peer failed it): there is nothing to tell the peer. */
  unexpect(id: number): void {
    if (this.#ends.get(id)?.kind === 'pending') this.#ends.delete(id);
  }

  /**
   * Joins a connected TCP socket to stream `id`. It is made half-open-capable here; the stream
   * is forgotten once both sides ended and the socket closed, or on a reset either way.
   */
  joinSocket(id: number, socket: net.Socket): void {
    const pending = this.#ends.get(id);
    const end: SocketEnd = {
      kind: 'socket',
      socket,
      uncredited: 0,
      credit: 0,
      creditQueued: false,
      readEnded: false,
      writeEnded: false,
      done: false,
    };
    this.#ends.set(id, end);
    // Half-close: the app's shutdown(SHUT_WR) must not close the other direction.
    (socket as net.Socket & { allowHalfOpen: boolean }).allowHalfOpen = true;
    socket.setNoDelay(true);
    socket.on('data', (bytes: Buffer) => {
      if (end.done) return;
      this.#session.sendStream({ type: 'streamData', stream: id, bytes });
      end.uncredited += bytes.length;
      if (end.uncredited >= STREAM_WINDOW_BYTES) socket.pause();
      this.#watchSession();
    });
    socket.on('end', () => {
      if (end.done) return;
      end.readEnded = true;
      this.#session.sendStream({ type: 'streamEnd', stream: id });
    });
    socket.on('error', (error: NodeJS.ErrnoException) => this.#fail(id, end, error.code ?? null));
    socket.on('close', () => {
      // Closed with both directions ended is a connection's normal end; any other close is a
      // reset for the peer.
      if (!(end.readEnded && end.writeEnded)) this.#fail(id, end, 'ECONNRESET');
      this.#forget(id, end);
    });
    if (this.#waitingForDrain) socket.pause();
    this.#replay(id, pending);
  }

  /**
   * Joins a datagram endpoint to stream `id`: `deliver` gets each datagram from the peer,
   * `close` is called when the stream is reset. Send this end's datagrams with sendDatagram.
   */
  joinDatagrams(id: number, deliver: (bytes: Buffer) => void, close: () => void): void {
    const pending = this.#ends.get(id);
    this.#ends.set(id, { kind: 'datagrams', deliver, close });
    this.#replay(id, pending);
  }

  #replay(id: number, pending: End | undefined): void {
    if (pending?.kind !== 'pending') return;
    for (const message of pending.messages) {
      if (this.#ends.has(id)) this.receive(message);
    }
  }

  /** Sends one datagram on stream `id`; false when it was dropped (the session is behind). */
  sendDatagram(id: number, bytes: Buffer): boolean {
    if (!this.#ends.has(id)) return false;
    if (this.#session.streamsBehind) {
      this.#datagramsDropped += 1;
      this.#dropsTimer ??= setTimeout(() => {
        this.#dropsTimer = undefined;
        this.#tellDrops(this.#datagramsDropped);
      }, DROPS_TOLD_EVERY_MS);
      return false;
    }
    this.#session.sendStream({ type: 'streamData', stream: id, bytes });
    return true;
  }

  /** Ends stream `id` from this side at once: its socket is reset, the peer told. */
  reset(id: number, errno: string | null = null): void {
    const end = this.#ends.get(id);
    if (!end) return;
    this.#ends.delete(id);
    this.#session.sendStream({ type: 'streamReset', stream: id, errno });
    if (end.kind === 'socket') {
      end.done = true;
      end.socket.resetAndDestroy();
    } else if (end.kind === 'datagrams') {
      end.close();
    }
  }

  /** A stream message from the peer. Those for a stream already forgotten are ignored. */
  receive(message: StreamMessage): void {
    const end = this.#ends.get(message.stream);
    if (!end) return;
    if (end.kind === 'pending') {
      end.messages.push(message);
      return;
    }
    if (end.kind === 'datagrams') {
      if (message.type === 'streamData') end.deliver(message.bytes);
      else if (message.type === 'streamReset') {
        this.#ends.delete(message.stream);
        end.close();
      }
      return;
    }
    switch (message.type) {
      case 'streamData': {
        const length = message.bytes.length;
        end.socket.write(message.bytes, () => this.#credit(message.stream, end, length));
        return;
      }
      case 'streamCredit':
        end.uncredited -= message.bytes;
        if (end.uncredited < STREAM_WINDOW_BYTES && !this.#waitingForDrain) end.socket.resume();
        return;
      case 'streamEnd':
        end.writeEnded = true;
        end.socket.end();
        return;
      case 'streamReset':
        end.done = true;
        this.#ends.delete(message.stream);
        end.socket.resetAndDestroy();
        return;
    }
  }

  /** The session is over: every stream's socket is reset, so its app sees an error, not a hang. */
  resetAll(): void {
    if (this.#dropsTimer) {
      clearTimeout(this.#dropsTimer);
      this.#dropsTimer = undefined;
      this.#tellDrops(this.#datagramsDropped);
    }
    for (const end of this.#ends.values()) {
      if (end.kind === 'socket') {
        end.done = true;
        end.socket.resetAndDestroy();
      } else if (end.kind === 'datagrams') {
        end.close();
      }
    }
    this.#ends.clear();
  }

  #credit(id: number, end: SocketEnd, bytes: number): void {
    if (end.done) return;
    end.credit += bytes;
    if (end.credit >= CREDIT_BATCH_BYTES) {
      this.#sendCredit(id, end);
    } else if (!end.creditQueued) {
      end.creditQueued = true;
      setImmediate(() => this.#sendCredit(id, end));
    }
  }

  #sendCredit(id: number, end: SocketEnd): void {
    end.creditQueued = false;
    if (end.credit === 0 || end.done) return;
    this.#session.sendStream({ type: 'streamCredit', stream: id, bytes: end.credit });
    end.credit = 0;
  }

  /** Stops every socket while the session is behind, until it drains. */
  #watchSession(): void {
    if (this.#waitingForDrain || !this.#session.streamsBehind) return;
    this.#waitingForDrain = true;
    for (const end of this.#ends.values()) if (end.kind === 'socket') end.socket.pause();
    this.#session.onceDrained(() => {
      this.#waitingForDrain = false;
      for (const end of this.#ends.values()) {
        if (end.kind === 'socket' && end.uncredited < STREAM_WINDOW_BYTES) end.socket.resume();
      }
    });
  }

  #fail(id: number, end: SocketEnd, errno: string | null): void {
    if (end.done) return;
    end.done = true;
    this.#session.sendStream({ type: 'streamReset', stream: id, errno });
    this.#forget(id, end);
  }

  #forget(id: number, end: SocketEnd): void {
    end.done = true;
    if (this.#ends.get(id) === end) this.#ends.delete(id);
  }
}
