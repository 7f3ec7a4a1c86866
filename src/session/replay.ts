/**
 * Replays the connections an agent mirrors into the local app's real listeners.
 *
 * ```ts
 * const replay = new Replay(client, {
 *   route: (port) => (port === 8080 ? { host: '127.0.0.1', port: 41234 } : undefined),
 *   onConnected: (sourcePort, appPort, original) => layer.announcePeer(sourcePort, appPort, original),
 * });
 * replay.on('connectionEnd', (end) => log(end.id, end.reason));
 * ```
 *
 * Each mirrored connection becomes one local TCP connection: the client's bytes are written in
 * order, the app's answers are read and thrown away, and the remote client's FIN or RST is
 * replayed as a FIN or RST once the app has taken every byte before it. The agent stream is
 * never paused: a local app that is slow, gone or refusing costs only its own connections, which
 * are reset and counted.
 *
 * Every byte the agent sends is accounted for (see {@link ReplayStats}): replayed when the app
 * took it, dropped when it did not, skipped when it was not meant for the app. A write that Node
 * reports done only means the kernel took the bytes; a reset discards what still waits in our
 * socket and what the app has not read from its own, and an app that is seconds behind (a
 * pre-fork server under load) has tens of kilobytes of a connection there when its client resets
 * it. So the replay looks at both sockets' queues (tcp-queues.ts) before it ends a connection,
 * holds a client's RST until the app has read everything before it, and counts as dropped what a
 * reset it could not avoid discarded.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import type { AgentClient } from '../protocol/client.js';
import type { ClosedMessage, DataMessage, Endpoint, OpenedMessage } from '../protocol/messages.js';
import { LagHistogram } from './lag-histogram.js';
import { socketPair, TcpQueues, type SocketPair } from './tcp-queues.js';

/** Where the app really listens. */
export interface ReplayDestination {
  host: string;
  port: number;
}

/** Its hooks run in event handlers (the agent client's, a socket's), which catch nothing. */
export interface ReplayOptions {
  /** Remote (target) port → local listener; undefined: not replayed (counted as skipped). */
  route(remotePort: number): ReplayDestination | undefined;
  /**
   * Replay connections joined mid-stream (default false: they are skipped and counted). Their
   * first bytes are an arbitrary point of the client's stream, which most apps cannot parse.
   */
  midStream?: boolean;
  /**
   * Bytes a connection may have waiting for a slow app before it is dropped (default 16 MiB: an
   * app busy for a tenth of a second at 1 Gbit/s, as a garbage collection or a busy machine
   * makes it, is not slow; 4 MiB lost a 200 MB upload now and then on a 2-core machine).
   */
  maxBufferedPerConnection?: number;
  /** The same, summed over all connections (default 64 MiB). */
  maxBufferedTotal?: number;
  /**
   * How long the app has, once the client closed or reset a connection, to take the bytes it
   * has not taken yet (the replayed RST waits for that), and then to close the connection after
   * the replayed FIN (default 10 s). Bytes it has not taken by then are dropped (`slow`).
   */
  lingerMs?: number;
  /**
   * Called once the local connection is established, before any of its bytes are written: the
   * place to tell the layer the original peer of the connection from `sourcePort` (ours, the
   * app's peer) to the app's `appPort`.
   */
  onConnected?(sourcePort: number, appPort: number, original: Endpoint): void;
  /**
   * Called once a local connection that was established is closed on both sides: its source
   * port may now be reused, and the app (which closed its side) no longer asks about it.
   */
  onClosed?(sourcePort: number, appPort: number): void;
}

/**
 * Why a replayed connection ended. `fin`/`rst`: the client closed or reset it and the app took
 * every byte. `expired`/`broken`: the agent gave up on it (idle, or a gap in the stream).
 * `slow`: the app did not read fast enough (its buffers stayed full, or it had not taken the
 * last bytes within `lingerMs` of the client's end). `refused`: the local connect failed.
 * `appGone`: the app reset or failed the connection. `sessionEnded`: the agent session or the
 * replay ended first.
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
  /**
   * The bytes of mirrored streams received from the agent (its `data` messages). Each of them
   * is, at any moment, in exactly one of the four counts below, so that
   * `bytesReceived = bytesReplayed + bytesDropped + bytesSkipped + bytesPending`; and once the
   * replay is closed `bytesPending` is 0.
   */
  bytesReceived: number;
  /**
   * Bytes the app took: read from its connection, or had on it when it closed the connection in
   * order. While a connection is open, what was written to it counts (Node says the kernel took
   * it); when it ends, what the app turned out not to take moves from here to `bytesDropped`.
   */
  bytesReplayed: number;
  /**
   * Bytes meant for the app that it did not take: not written because the app was slow, gone or
   * refusing, or the agent or the session ended the connection first; discarded by a reset while
   * they waited in our socket or unread in the app's; or arriving after the connection's replay
   * had ended. For a connection the app reset itself, what it had not been seen to take when it
   * did (an upper bound: its socket is gone with the exact count).
   */
  bytesDropped: number;
  /** Bytes of connections not replayed on purpose: joined mid-stream, or to an unrouted port. */
  bytesSkipped: number;
  /** Bytes of open connections not written yet (a level, not a total). */
  bytesPending: number;
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
  destination: ReplayDestination;
}

export interface ReplaySkipInfo {
  id: number;
  client: Endpoint;
  server: Endpoint;
  reason: 'midStream' | 'unrouted';
}

/** How the replay of a connection ended, when it ended (see `accounted` for its final bytes). */
export interface ReplayEndInfo {
  id: number;
  reason: ReplayEndReason;
  /** Our source port, when the local connection was established. */
  localPort: number | undefined;
  /** Final: nothing is replayed after the end. */
  bytesReplayed: number;
  /** So far: bytes the client still sends after an early end are dropped too. */
  bytesDropped: number;
  /** Bytes the agent could not deliver (`broken`). */
  gapBytes: number;
  error?: Error;
}

/**
 * The final count of one mirrored connection, once neither the agent nor the replay has more of
 * it: `bytesMirrored = bytesReplayed + bytesDropped + bytesSkipped`, with `bytesSkipped` 0 for a
 * replayed connection and `bytesMirrored` for a skipped one.
 */
export interface ReplayAccount {
  id: number;
  client: Endpoint;
  server: Endpoint;
  /** false for a connection skipped (then `reason` says why), true for one replayed. */
  replayed: boolean;
  reason: ReplayEndReason | ReplaySkipInfo['reason'];
  /** The bytes of its stream the agent sent. */
  bytesMirrored: number;
  bytesReplayed: number;
  bytesDropped: number;
  bytesSkipped: number;
  gapBytes: number;
}

export interface ReplayEvents {
  /** A local connection is being opened for a mirrored one. */
  connection: [ReplayConnectionInfo];
  /** Emitted exactly once per `connection`. */
  connectionEnd: [ReplayEndInfo];
  /** Emitted exactly once per mirrored connection, replayed or skipped, when its count is final. */
  accounted: [ReplayAccount];
}

const MIB = 1024 * 1024;
/**
 * The source address of replayed connections to an IPv4 loopback listener. The layer's copy is
 * layer/replay_source.h; test/record-layout.test.ts fails when the two differ.
 */
export const REPLAY_SOURCE = '127.0.0.2';

interface Replayed {
  info: ReplayConnectionInfo;
  socket: net.Socket;
  localPort: number | undefined;
  /** Our socket and the app's, in the kernel's tables; set once connected. */
  pair: SocketPair | undefined;
  /** This connection's share of the replay's buffered total. */
  buffered: number;
  /** Bytes of it the agent sent. */
  bytesReceived: number;
  /** Bytes whose write Node reported done while the connection was open. */
  bytesWritten: number;
  /** Bytes the app is known to have taken (see TcpQueues.taken), at most bytesWritten. */
  bytesTaken: number;
  /** The agent closed it: the client's FIN or RST, replayed once the app took every byte. */
  closing: 'fin' | 'rst' | undefined;
  /** When a closing connection is given up on if the app has not taken everything. */
  giveUpAt: number;
  /** Being given up on (see #giveUp); the decision follows within the loop's turn. */
  givingUp: { reason: ReplayEndReason; error?: Error } | undefined;
  /** The agent has no more of it: its received count is final. */
  agentClosed: boolean;
  gapBytes: number;
  /** The app closed its side (FIN). */
  appEnded: boolean;
  end: ReplayEndReason | undefined;
  accounted: boolean;
  linger: NodeJS.Timeout | undefined;
}

/** Skipped connections until the agent closes them, with their bytes. */
interface Skipped {
  info: ReplaySkipInfo;
  bytes: number;
}

/** Bounds of the pause between looks at the kernel's queues while connections wait for the app. */
const LOOK_MIN_MS = 2;
const LOOK_MAX_MS = 250;

export class Replay extends EventEmitter<ReplayEvents> {
  #client!: AgentClient;
  readonly #options: ReplayOptions;
  readonly #maxPerConnection: number;
  readonly #maxTotal: number;
  readonly #lingerMs: number;
  /** By agent id, until the agent closes the connection. */
  readonly #byId = new Map<number, Replayed>();
  /** Skipped agent ids, to count their bytes, until the agent closes them. */
  readonly #skipped = new Map<number, Skipped>();
  /** Every local socket not yet closed, lingering ones included. */
  readonly #sockets = new Set<net.Socket>();
  /** Closed by the agent, waiting for the app to take every byte (no longer in #byId). */
  readonly #waiting = new Set<Replayed>();
  /** Being given up on: decided together, after one look at the kernel's queues. */
  readonly #givingUp = new Set<Replayed>();
  #lookTimer: NodeJS.Timeout | undefined;
  #lookPauseMs = LOOK_MIN_MS;
  #buffered = 0;
  /** Bytes received for open connections and not written yet: `bytesPending`. */
  #unwritten = 0;
  #closing = false;
  readonly #sessionLag = new LagHistogram();
  readonly #recentLag = new LagHistogram();
  readonly #stats: Omit<ReplayStats, 'lagP50Ms' | 'lagP99Ms' | 'bytesPending'> = {
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
    bytesReceived: 0,
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
    this.#maxPerConnection = options.maxBufferedPerConnection ?? 16 * MIB;
    this.#maxTotal = options.maxBufferedTotal ?? 64 * MIB;
    this.#lingerMs = options.lingerMs ?? 10_000;
    this.#attach(client);
  }

  #attach(client: AgentClient): void {
    this.#client = client;
    client.on('opened', this.#listeners.opened);
    client.on('data', this.#listeners.data);
    client.on('closed', this.#listeners.closed);
    client.on('end', this.#listeners.end);
  }

  #detach(): void {
    this.#client.off('opened', this.#listeners.opened);
    this.#client.off('data', this.#listeners.data);
    this.#client.off('closed', this.#listeners.closed);
    this.#client.off('end', this.#listeners.end);
  }

  /**
   * Goes on with another agent's session, after the target was replaced: the connections of
   * the previous session ended with it (their ids are not the new agent's), the counts and the
   * lag of the whole session go on.
   */
  follow(client: AgentClient): void {
    this.#detach();
    this.#endAll();
    this.#attach(client);
  }

  stats(): ReplayStats {
    return {
      ...this.#stats,
      bytesPending: this.#unwritten,
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
   * Stops replaying: detaches from the client and resets every local connection still open,
   * counting what the app had not taken. Resolves once all local sockets are closed.
   */
  async close(): Promise<void> {
    if (!this.#closing) {
      this.#closing = true;
      clearTimeout(this.#lookTimer);
      this.#detach();
      this.#endAll();
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
    const destination = this.#options.route(opened.server.port);
    if (destination === undefined) {
      this.#skip({ ...base, reason: 'unrouted' });
      return;
    }
    this.#stats.replayed++;
    // Half-open: the app closing its side must not end ours while the client still sends.
    const socket = net.connect({
      host: destination.host,
      port: destination.port,
      // The layer waits for the original peer only of connections from this address (see
      // layer/layer.c), so the app's other loopback clients are left alone.
      localAddress: destination.host === '127.0.0.1' ? REPLAY_SOURCE : undefined,
      allowHalfOpen: true,
    });
    const connection: Replayed = {
      info: { ...base, midStream: opened.midStream, destination },
      socket,
      localPort: undefined,
      pair: undefined,
      buffered: 0,
      bytesReceived: 0,
      bytesWritten: 0,
      bytesTaken: 0,
      closing: undefined,
      giveUpAt: 0,
      givingUp: undefined,
      agentClosed: false,
      gapBytes: 0,
      appEnded: false,
      end: undefined,
      accounted: false,
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
      this.#giveUp(connection, connection.localPort === undefined ? 'refused' : 'appGone', error),
    );
    // Also after an orderly close by both sides: then the look #giveUp takes finds every byte
    // taken and the connection ends as the client ended it.
    socket.on('close', () => {
      clearTimeout(connection.linger);
      this.#sockets.delete(socket);
      if (connection.localPort !== undefined) {
        this.#options.onClosed?.(connection.localPort, destination.port);
      }
      this.#giveUp(connection, 'appGone');
    });
    this.emit('connection', connection.info);
  }

  #onConnect(connection: Replayed): void {
    // Being reset: no peer to announce. A connection whose client closed it before it was
    // even established (with no bytes) is still accepted by the app, whose layer waits for it.
    if (connection.end !== undefined && connection.end !== 'fin') return;
    const { socket } = connection;
    const localPort = socket.localPort as number; // set once connected
    connection.localPort = localPort;
    connection.pair = socketPair(
      { address: socket.localAddress as string, port: localPort },
      { address: socket.remoteAddress as string, port: socket.remotePort as number },
    );
    const { destination, client } = connection.info;
    this.#options.onConnected?.(localPort, destination.port, client);
  }

  #skip(info: ReplaySkipInfo): void {
    if (info.reason === 'midStream') this.#stats.skippedMidStream++;
    else this.#stats.skippedUnrouted++;
    this.#skipped.set(info.id, { info, bytes: 0 });
  }

  #onData({ id, bytes, tapMicros }: DataMessage): void {
    this.#stats.bytesReceived += bytes.length;
    const connection = this.#byId.get(id);
    if (connection === undefined) {
      const skipped = this.#skipped.get(id);
      if (skipped) {
        skipped.bytes += bytes.length;
        this.#stats.bytesSkipped += bytes.length;
      } else {
        // Data of no connection we know: the agent sends none (data comes between opened and
        // closed), but if it did, the bytes would still be counted.
        this.#stats.bytesDropped += bytes.length;
      }
      return;
    }
    connection.bytesReceived += bytes.length;
    if (connection.end !== undefined) {
      this.#stats.bytesDropped += bytes.length;
      return;
    }
    this.#unwritten += bytes.length;
    if (connection.givingUp) return; // counted as dropped when the decision is made
    // Bytes after the app's FIN: a dead app's kernel answers them with an RST that we would
    // never read (reading stops at the FIN), and apps that shut down only their sending side
    // are rare; so the bytes are taken as lost.
    if (connection.appEnded) {
      this.#giveUp(connection, 'appGone');
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
      this.#giveUp(connection, 'slow');
      return;
    }
    // A copy: `bytes` is a view into the agent's frame, which a slow app would otherwise keep
    // alive whole for a few bytes of it.
    const chunk = Buffer.from(bytes);
    socket.write(chunk, (error) => {
      if (!error && connection.end === undefined) {
        connection.bytesWritten += chunk.length;
        this.#stats.bytesReplayed += chunk.length;
        this.#unwritten -= chunk.length;
        // Written to the app's socket: the bytes have arrived locally.
        const lag = this.#client.lagMicros(tapMicros);
        this.#sessionLag.record(lag);
        this.#recentLag.record(lag);
      }
      this.#account(connection);
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
    const skipped = this.#skipped.get(id);
    if (skipped) {
      this.#skipped.delete(id);
      this.#accountSkipped(skipped);
      return;
    }
    const connection = this.#byId.get(id);
    if (connection === undefined) return;
    this.#byId.delete(id);
    connection.agentClosed = true;
    connection.gapBytes = gapBytes;
    if (connection.end !== undefined) {
      this.#accounted(connection);
      return;
    }
    if (connection.givingUp) return;
    switch (reason) {
      case 'fin':
        connection.socket.end();
        this.#waitForApp(connection, 'fin');
        return;
      case 'rst':
        this.#waitForApp(connection, 'rst');
        return;
      case 'expired':
      case 'broken':
        this.#giveUp(connection, reason);
        return;
    }
  }

  /**
   * The client closed (`fin`, already written after the bytes) or reset the connection: it ends
   * the same way once the app has taken every byte, which the kernel's queues tell (see
   * #look); or when the app closes it; or, after `lingerMs`, as `slow`.
   */
  #waitForApp(connection: Replayed, closing: 'fin' | 'rst'): void {
    connection.closing = closing;
    if (connection.bytesReceived === 0) {
      this.#decide(connection, closing);
      return;
    }
    connection.giveUpAt = Date.now() + this.#lingerMs;
    this.#waiting.add(connection);
    this.#scheduleLook();
  }

  #scheduleLook(): void {
    if (this.#lookTimer !== undefined || this.#waiting.size === 0 || this.#closing) return;
    this.#lookTimer = setTimeout(() => void this.#look(), this.#lookPauseMs);
  }

  /** One look at the kernel's queues for every connection waiting for the app. */
  async #look(): Promise<void> {
    const waiting = [...this.#waiting];
    if (waiting.length === 0) {
      this.#lookTimer = undefined;
      return;
    }
    // What Node had reported written before the look: bytes written during it would otherwise
    // count as taken although the look did not see them.
    const written = waiting.map((connection) => connection.bytesWritten);
    const started = performance.now();
    const queues = await TcpQueues.read(wantedSockets(waiting));
    // Looks cost in proportion to the sockets of the namespace: they stay rare next to the
    // rest of the work however many there are.
    const cost = performance.now() - started;
    this.#lookPauseMs = Math.min(LOOK_MAX_MS, Math.max(LOOK_MIN_MS, cost * 10));
    this.#lookTimer = undefined;
    if (this.#closing) return;
    const now = Date.now();
    waiting.forEach((connection, i) => {
      if (!this.#waiting.has(connection)) return; // ended meanwhile
      learnTaken(connection, queues, written[i] as number);
      if (connection.bytesTaken === connection.bytesReceived) {
        this.#decide(connection, connection.closing as 'fin' | 'rst');
      } else if (now >= connection.giveUpAt) {
        this.#giveUp(connection, 'slow');
      }
    });
    this.#scheduleLook();
  }

  /**
   * Ends a connection that cannot be replayed whole (or whose socket closed): decided at the
   * end of this turn of the loop, together with the others given up on in it, after one look at
   * the kernel's queues (one read of the tables for them all) to know what the app took before
   * the reset. Until then nothing more is written to it.
   */
  #giveUp(connection: Replayed, reason: ReplayEndReason, error?: Error): void {
    if (connection.end !== undefined || connection.givingUp) return;
    connection.givingUp = { reason, ...(error && { error }) };
    this.#waiting.delete(connection);
    this.#givingUp.add(connection);
    if (this.#givingUp.size === 1) setImmediate(() => this.#decideGivenUp());
  }

  #decideGivenUp(): void {
    const connections = [...this.#givingUp];
    if (connections.length === 0) return; // the replay was closed meanwhile
    this.#givingUp.clear();
    const queues = TcpQueues.readSync(wantedSockets(connections));
    for (const connection of connections) {
      learnTaken(connection, queues, connection.bytesWritten);
      const { reason, error } = connection.givingUp as { reason: ReplayEndReason; error?: Error };
      // A socket closed in order by both sides after every byte was taken: the end the client
      // asked for, not a loss.
      const whole = connection.closing && connection.bytesTaken === connection.bytesReceived;
      this.#decide(connection, whole ? (connection.closing as 'fin' | 'rst') : reason, error);
    }
  }

  /** Ends the replay of every connection not ended yet, and counts every connection. */
  #endAll(): void {
    const open = new Set([...this.#byId.values(), ...this.#waiting, ...this.#givingUp]);
    this.#byId.clear();
    this.#waiting.clear();
    this.#givingUp.clear();
    const undecided = [...open].filter((connection) => connection.end === undefined);
    const queues = TcpQueues.readSync(wantedSockets(undecided));
    for (const connection of open) {
      if (connection.end === undefined) {
        learnTaken(connection, queues, connection.bytesWritten);
        const whole = connection.closing && connection.bytesTaken === connection.bytesReceived;
        const reason = connection.givingUp?.reason ?? 'sessionEnded';
        this.#decide(connection, whole ? (connection.closing as 'fin' | 'rst') : reason);
      }
      // Nothing more of it will be read: its count is final.
      this.#accounted(connection);
    }
    for (const skipped of this.#skipped.values()) this.#accountSkipped(skipped);
    this.#skipped.clear();
  }

  /**
   * Records how a connection ended (the first decision wins), settles its bytes (what the app
   * did not take moves from replayed to dropped) and resets its local socket unless the
   * client's FIN was replayed: a truncated stream must not look complete to the app.
   */
  #decide(connection: Replayed, reason: ReplayEndReason, error?: Error): void {
    if (connection.end !== undefined) return;
    connection.end = reason;
    this.#waiting.delete(connection);
    this.#account(connection);
    const socket = connection.socket;
    if (reason !== 'fin') {
      if (!socket.destroyed) socket.resetAndDestroy();
    } else if (!socket.destroyed) {
      // Its answers are not wanted, only its socket back.
      connection.linger = setTimeout(() => socket.resetAndDestroy(), this.#lingerMs);
      connection.linger.unref();
    }
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
    const { bytesReceived, bytesWritten, bytesTaken } = connection;
    stats.bytesReplayed -= bytesWritten - bytesTaken;
    stats.bytesDropped += bytesReceived - bytesTaken;
    this.#unwritten -= bytesReceived - bytesWritten;
    this.emit('connectionEnd', {
      id: connection.info.id,
      reason,
      localPort: connection.localPort,
      bytesReplayed: bytesTaken,
      bytesDropped: bytesReceived - bytesTaken,
      gapBytes: connection.gapBytes,
      ...(error && { error }),
    });
    if (connection.agentClosed) this.#accounted(connection);
  }

  #accounted(connection: Replayed): void {
    if (connection.accounted || connection.end === undefined) return;
    connection.accounted = true;
    const { info, bytesReceived, bytesTaken } = connection;
    this.emit('accounted', {
      id: info.id,
      client: info.client,
      server: info.server,
      replayed: true,
      reason: connection.end,
      bytesMirrored: bytesReceived,
      bytesReplayed: bytesTaken,
      bytesDropped: bytesReceived - bytesTaken,
      bytesSkipped: 0,
      gapBytes: connection.gapBytes,
    });
  }

  #accountSkipped({ info, bytes }: Skipped): void {
    this.emit('accounted', {
      id: info.id,
      client: info.client,
      server: info.server,
      replayed: false,
      reason: info.reason,
      bytesMirrored: bytes,
      bytesReplayed: 0,
      bytesDropped: 0,
      bytesSkipped: bytes,
      gapBytes: 0,
    });
  }
}

/** The kernel's rows to read for these connections (those connected). */
function wantedSockets(connections: Iterable<Replayed>): Set<string> {
  const wanted = new Set<string>();
  for (const { pair } of connections) {
    if (pair) {
      wanted.add(pair.ours);
      wanted.add(pair.app);
    }
  }
  return wanted;
}

/** What a look says the app took of `written` bytes; a look that cannot tell changes nothing. */
function learnTaken(connection: Replayed, queues: TcpQueues, written: number): void {
  if (connection.pair === undefined) return;
  const taken = queues.taken(connection.pair, written);
  if (taken !== undefined && taken > connection.bytesTaken) connection.bytesTaken = taken;
}
