/**
 * Replays the connections an agent mirrors into the local app's real listeners.
 *
 * ```ts
 * const replay = new Replay(client, {
 *   route: (port) => (port === 8080 ? { host: '127.0.0.1', port: 41234 } : undefined),
 *   onConnected: (localPort, original) => layer.announcePeer(localPort, original),
 * });
 * replay.on('connectionEnd', (end) => log(end.id, end.reason));
 * ```
 *
 * Each mirrored connection becomes one local TCP connection: the client's bytes are written in
 * order, the app's answers are read and thrown away, and the remote client's FIN or RST is
 * replayed as a FIN or RST. The agent stream is never paused: a local app that is slow, gone or
 * refusing costs only its own connections, which are reset and counted.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import type { AgentClient } from '../protocol/client.js';
import type { ClosedMessage, DataMessage, Endpoint, OpenedMessage } from '../protocol/messages.js';
import { LagHistogram } from './lag-histogram.js';

/** Where the app really listens. */
export interface ReplayTarget {
  host: string;
  port: number;
}

export interface ReplayOptions {
  /** Remote (target) port → local listener; undefined: not replayed (counted as skipped). */
  route(remotePort: number): ReplayTarget | undefined;
  /**
   * Replay connections joined mid-stream (default false: they are skipped and counted). Their
   * first bytes are an arbitrary point of the client's stream, which most apps cannot parse.
   */
  midStream?: boolean;
  /** Bytes a connection may have waiting for a slow app before it is dropped (default 4 MiB). */
  maxBufferedPerConnection?: number;
  /** The same, summed over all connections (default 64 MiB). */
  maxBufferedTotal?: number;
  /**
   * How long the app may keep a connection open after it received the client's FIN before it
   * is reset (default 10 s); its answers are not wanted, only its socket back.
   */
  lingerMs?: number;
  /**
   * Called once the local connection is established, before any of its bytes are written: the
   * place to tell the layer the original peer of `localPort` (our source port, the app's peer).
   */
  onConnected?(localPort: number, original: Endpoint): void;
}

/**
 * Why a replayed connection ended. `fin`/`rst`: the client closed or reset it and the app got
 * every byte. `expired`/`broken`: the agent gave up on it (idle, or a gap in the stream).
 * `slow`: the app did not read fast enough. `refused`: the local connect failed. `appGone`:
 * the app reset or failed the connection. `sessionEnded`: the agent session or the replay
 * ended first.
 */
export type ReplayEndReason =
  'fin' | 'rst' | 'expired' | 'broken' | 'slow' | 'refused' | 'appGone' | 'sessionEnded';

export interface ReplayStats {
  /** Mirrored connections seen, replayed or not. */
  opened: number;
  /** Local connections attempted. */
  replayed: number;
  skippedMidStream: number;
  skippedUnrouted: number;
  /** Ended by the client (fin/rst) with every byte delivered. */
  completed: number;
  /** Ended by the agent (expired/broken): the app got a reset, not the whole stream. */
  endedByAgent: number;
  failedToConnect: number;
  droppedSlow: number;
  droppedAppGone: number;
  droppedSessionEnded: number;
  /** Bytes handed to the app's connections. */
  bytesReplayed: number;
  /** Bytes of replayed connections that the app never got. */
  bytesDropped: number;
  /** Bytes of skipped connections. */
  bytesSkipped: number;
  /**
   * Mirror lag over the session, ms: from the tap seeing bytes arrive at the target to their
   * hand-over to the app's connection. null before any byte was replayed.
   */
  lagP50Ms: number | null;
  lagP99Ms: number | null;
}

/** The lag percentiles since the previous call of {@link Replay.takeRecentLag}. */
export interface RecentLag {
  lagP50Ms: number | null;
  lagP99Ms: number | null;
}

export interface ReplayConnectionInfo {
  id: number;
  client: Endpoint;
  server: Endpoint;
  midStream: boolean;
  target: ReplayTarget;
}

export interface ReplaySkipInfo {
  id: number;
  client: Endpoint;
  server: Endpoint;
  reason: 'midStream' | 'unrouted';
}

export interface ReplayEndInfo {
  id: number;
  reason: ReplayEndReason;
  /** Our source port, when the local connection was established. */
  localPort: number | undefined;
  bytesReplayed: number;
  bytesDropped: number;
  /** Bytes the agent could not deliver (`broken`). */
  gapBytes: number;
  error?: Error;
}

export interface ReplayEvents {
  /** A local connection is being opened for a mirrored one. */
  connection: [ReplayConnectionInfo];
  /** It is established; `localPort` is our source port, the app's view of its peer. */
  connected: [{ id: number; localPort: number; client: Endpoint }];
  skipped: [ReplaySkipInfo];
  /** Emitted exactly once per `connection`. */
  connectionEnd: [ReplayEndInfo];
  /** onConnected threw; the replay goes on. */
  hookError: [Error];
}

const MIB = 1024 * 1024;
/** The source address of replayed connections to an IPv4 loopback listener. */
export const REPLAY_SOURCE = '127.0.0.2';

interface Replayed {
  info: ReplayConnectionInfo;
  socket: net.Socket;
  localPort: number | undefined;
  /** This connection's share of the replay's buffered total. */
  buffered: number;
  bytesReceived: number;
  bytesReplayed: number;
  /** The client reset: reset the app's connection once the buffered bytes are written. */
  resetWhenFlushed: boolean;
  /** The app closed its side (FIN). */
  appEnded: boolean;
  end: ReplayEndReason | undefined;
  linger: NodeJS.Timeout | undefined;
}

export class Replay extends EventEmitter<ReplayEvents> {
  readonly #client: AgentClient;
  readonly #options: ReplayOptions;
  readonly #maxPerConnection: number;
  readonly #maxTotal: number;
  readonly #lingerMs: number;
  /** By agent id, until the agent closes the connection. */
  readonly #byId = new Map<number, Replayed>();
  /** Skipped agent ids, to count their bytes, until the agent closes them. */
  readonly #skipped = new Set<number>();
  /** Every local socket not yet closed, lingering ones included. */
  readonly #sockets = new Set<net.Socket>();
  #buffered = 0;
  #closing = false;
  readonly #sessionLag = new LagHistogram();
  readonly #recentLag = new LagHistogram();
  readonly #stats: Omit<ReplayStats, 'lagP50Ms' | 'lagP99Ms'> = {
    opened: 0,
    replayed: 0,
    skippedMidStream: 0,
    skippedUnrouted: 0,
    completed: 0,
    endedByAgent: 0,
    failedToConnect: 0,
    droppedSlow: 0,
    droppedAppGone: 0,
    droppedSessionEnded: 0,
    bytesReplayed: 0,
    bytesDropped: 0,
    bytesSkipped: 0,
  };
  readonly #listeners = {
    opened: (opened: OpenedMessage) => this.#onOpened(opened),
    data: (data: DataMessage) => this.#onData(data),
    closed: (closed: ClosedMessage) => this.#onClosed(closed),
    end: () => this.#endAll(),
  };

  constructor(client: AgentClient, options: ReplayOptions) {
    super();
    this.#client = client;
    this.#options = options;
    this.#maxPerConnection = options.maxBufferedPerConnection ?? 4 * MIB;
    this.#maxTotal = options.maxBufferedTotal ?? 64 * MIB;
    this.#lingerMs = options.lingerMs ?? 10_000;
    client.on('opened', this.#listeners.opened);
    client.on('data', this.#listeners.data);
    client.on('closed', this.#listeners.closed);
    client.on('end', this.#listeners.end);
  }

  stats(): ReplayStats {
    return {
      ...this.#stats,
      lagP50Ms: this.#sessionLag.quantileMs(0.5) ?? null,
      lagP99Ms: this.#sessionLag.quantileMs(0.99) ?? null,
    };
  }

  takeRecentLag(): RecentLag {
    const recent = {
      lagP50Ms: this.#recentLag.quantileMs(0.5) ?? null,
      lagP99Ms: this.#recentLag.quantileMs(0.99) ?? null,
    };
    this.#recentLag.reset();
    return recent;
  }

  /** Bytes waiting for local apps right now, over all connections. */
  get buffered(): number {
    return this.#buffered;
  }

  /**
   * Stops replaying: detaches from the client and resets every local connection still open.
   * Resolves once all local sockets are closed.
   */
  async close(): Promise<void> {
    if (!this.#closing) {
      this.#closing = true;
      this.#client.off('opened', this.#listeners.opened);
      this.#client.off('data', this.#listeners.data);
      this.#client.off('closed', this.#listeners.closed);
      this.#client.off('end', this.#listeners.end);
      this.#endAll();
      this.#skipped.clear();
    }
    const sockets = [...this.#sockets];
    for (const socket of sockets) if (!socket.destroyed) socket.resetAndDestroy();
    await Promise.all(
      sockets.map(
        (socket) =>
          new Promise<void>((resolve) => {
            if (socket.closed) resolve();
            else socket.once('close', () => resolve());
          }),
      ),
    );
  }

  #onOpened(opened: OpenedMessage): void {
    this.#stats.opened++;
    const base = { id: opened.id, client: opened.client, server: opened.server };
    if (opened.midStream && !this.#options.midStream) {
      this.#skip({ ...base, reason: 'midStream' });
      return;
    }
    let target: ReplayTarget | undefined;
    try {
      target = this.#options.route(opened.server.port);
    } catch (error) {
      this.emit('hookError', asError(error));
    }
    if (target === undefined) {
      this.#skip({ ...base, reason: 'unrouted' });
      return;
    }
    this.#stats.replayed++;
    // Half-open: the app closing its side must not end ours while the client still sends.
    const socket = net.connect({
      host: target.host,
      port: target.port,
      // The layer waits for the original peer only of connections from this address (see
      // layer/layer.c), so the app's other loopback clients are left alone.
      localAddress: target.host === '127.0.0.1' ? REPLAY_SOURCE : undefined,
      allowHalfOpen: true,
    });
    const connection: Replayed = {
      info: { ...base, midStream: opened.midStream, target },
      socket,
      localPort: undefined,
      buffered: 0,
      bytesReceived: 0,
      bytesReplayed: 0,
      resetWhenFlushed: false,
      appEnded: false,
      end: undefined,
      linger: undefined,
    };
    this.#byId.set(opened.id, connection);
    this.#sockets.add(socket);
    socket.setNoDelay(true);
    // Registered before the first write, so it runs before Node sends the bytes queued during
    // the connect: the layer is told of the peer before the app has anything to read.
    socket.once('connect', () => this.#onConnect(connection));
    socket.on('data', () => undefined);
    socket.on('end', () => {
      connection.appEnded = true;
    });
    socket.on('error', (error) =>
      this.#decide(connection, connection.localPort === undefined ? 'refused' : 'appGone', error),
    );
    socket.on('close', () => {
      clearTimeout(connection.linger);
      this.#sockets.delete(socket);
      this.#decide(connection, 'appGone');
    });
    this.emit('connection', connection.info);
  }

  #onConnect(connection: Replayed): void {
    if (connection.end !== undefined) return; // being reset: no peer to announce
    const localPort = connection.socket.localPort as number; // set once connected
    connection.localPort = localPort;
    try {
      this.#options.onConnected?.(localPort, connection.info.client);
    } catch (error) {
      this.emit('hookError', asError(error));
    }
    this.emit('connected', { id: connection.info.id, localPort, client: connection.info.client });
    this.#resetIfFlushed(connection);
  }

  #skip(info: ReplaySkipInfo): void {
    if (info.reason === 'midStream') this.#stats.skippedMidStream++;
    else this.#stats.skippedUnrouted++;
    this.#skipped.add(info.id);
    this.emit('skipped', info);
  }

  #onData({ id, bytes, tapMicros }: DataMessage): void {
    const connection = this.#byId.get(id);
    if (connection === undefined) {
      if (this.#skipped.has(id)) this.#stats.bytesSkipped += bytes.length;
      return;
    }
    connection.bytesReceived += bytes.length;
    if (connection.end !== undefined) {
      this.#stats.bytesDropped += bytes.length;
      return;
    }
    // Bytes after the app's FIN: a dead app's kernel answers them with an RST that we would
    // never read (reading stops at the FIN), and apps that shut down only their sending side
    // are rare; so the bytes are taken as lost.
    if (connection.appEnded) {
      this.#decide(connection, 'appGone');
      return;
    }
    const socket = connection.socket;
    // A chunk bigger than the bound itself is let through into an empty buffer: it is already
    // in memory as the agent's frame, and refusing it would drop connections of a fast app.
    if (
      socket.writableLength > 0 &&
      (socket.writableLength + bytes.length > this.#maxPerConnection ||
        this.#totalAfter(bytes.length) > this.#maxTotal)
    ) {
      this.#decide(connection, 'slow');
      return;
    }
    // A copy: `bytes` is a view into the agent's frame, which a slow app would otherwise keep
    // alive whole for a few bytes of it.
    const chunk = Buffer.from(bytes);
    socket.write(chunk, (error) => {
      if (!error && connection.end === undefined) {
        connection.bytesReplayed += chunk.length;
        this.#stats.bytesReplayed += chunk.length;
        // Written to the app's socket: the bytes have arrived locally.
        const lag = this.#client.lagMicros(tapMicros);
        this.#sessionLag.record(lag);
        this.#recentLag.record(lag);
      }
      this.#account(connection);
      this.#resetIfFlushed(connection);
    });
    this.#account(connection);
  }

  /** The buffered total after adding `bytes`, recounted when the running total says over. */
  #totalAfter(bytes: number): number {
    if (this.#buffered + bytes <= this.#maxTotal) return this.#buffered + bytes;
    for (const connection of this.#byId.values()) this.#account(connection);
    return this.#buffered + bytes;
  }

  #account(connection: Replayed): void {
    const now = connection.end === undefined ? connection.socket.writableLength : 0;
    this.#buffered += now - connection.buffered;
    connection.buffered = now;
  }

  #onClosed({ id, reason, gapBytes }: ClosedMessage): void {
    this.#skipped.delete(id);
    const connection = this.#byId.get(id);
    if (connection === undefined) return;
    this.#byId.delete(id);
    if (connection.end !== undefined) return;
    const socket = connection.socket;
    switch (reason) {
      case 'fin':
        socket.once('finish', () => {
          this.#decide(connection, 'fin');
          connection.linger = setTimeout(() => socket.resetAndDestroy(), this.#lingerMs);
          connection.linger.unref();
        });
        socket.end();
        return;
      case 'rst':
        connection.resetWhenFlushed = true;
        this.#resetIfFlushed(connection);
        return;
      case 'expired':
      case 'broken':
        this.#decide(connection, reason, undefined, gapBytes);
        return;
    }
  }

  #resetIfFlushed(connection: Replayed): void {
    const socket = connection.socket;
    if (!connection.resetWhenFlushed || connection.end !== undefined) return;
    if (socket.connecting || socket.writableLength > 0) return;
    this.#decide(connection, 'rst');
  }

  /** Ends the replay of every connection the agent has not closed yet. */
  #endAll(): void {
    for (const connection of this.#byId.values()) this.#decide(connection, 'sessionEnded');
    this.#byId.clear();
  }

  /**
   * Records how a connection ended (the first decision wins) and resets its local socket
   * unless the client's FIN was replayed: a truncated stream must not look complete to the app.
   */
  #decide(connection: Replayed, reason: ReplayEndReason, error?: Error, gapBytes = 0): void {
    if (connection.end !== undefined) return;
    const unsent = connection.bytesReceived - connection.bytesReplayed;
    connection.end = reason;
    this.#account(connection);
    const socket = connection.socket;
    if (reason !== 'fin' && !socket.destroyed) socket.resetAndDestroy();
    const stats = this.#stats;
    switch (reason) {
      case 'fin':
      case 'rst':
        stats.completed++;
        break;
      case 'expired':
      case 'broken':
        stats.endedByAgent++;
        break;
      case 'slow':
        stats.droppedSlow++;
        break;
      case 'refused':
        stats.failedToConnect++;
        break;
      case 'appGone':
        stats.droppedAppGone++;
        break;
      case 'sessionEnded':
        stats.droppedSessionEnded++;
        break;
    }
    const dropped = reason === 'fin' || reason === 'rst' ? 0 : unsent;
    stats.bytesDropped += dropped;
    this.emit('connectionEnd', {
      id: connection.info.id,
      reason,
      localPort: connection.localPort,
      bytesReplayed: connection.bytesReplayed,
      bytesDropped: dropped,
      gapBytes,
      ...(error && { error }),
    });
  }
}

function asError(value: unknown): Error {
  return value instanceof Error ? value : new Error(String(value));
}
