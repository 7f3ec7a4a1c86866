/**
 * The CLI's side of mirroring: which of the target's ports are replayed where, the replay of
 * their connections into the app's listeners, and what the session reports of them (its
 * events). The ports are the user's (`--port`) and those the app listens on as its layer
 * reports them, less the ignored ones; they are subscribed on the agent's session, and again on
 * a replacement agent's when the session follows its target.
 */
import type { AgentClient } from '../../protocol/client.js';
import type { Counters, Endpoint } from '../../protocol/messages.js';
import type { AppListener, LayerChannel } from '../../session/layer-channel.js';
import { Replay, type ReplayDestination, type ReplayStats } from '../../session/replay.js';

/** The session's progress, as `mirror --json` prints it (one JSON object a line). */
export type MirrorEvent =
  | { event: 'ready'; target: string; interfaces: string[] }
  | { event: 'listen'; port: number; localPort: number }
  | { event: 'opened'; id: number; client: Endpoint; server: Endpoint }
  /**
   * A replayed connection's final count, once the agent and the replay are both done with it:
   * `bytesMirrored` (its bytes the agent sent) = `bytesReplayed` + `bytesDropped`.
   */
  | {
      event: 'closed';
      id: number;
      reason: string;
      bytesMirrored: number;
      bytesReplayed: number;
      bytesDropped: number;
    }
  /** The same for a connection not replayed (joined mid-stream, or to an unrouted port). */
  | {
      event: 'skipped';
      id: number;
      client: Endpoint;
      server: Endpoint;
      reason: string;
      bytesSkipped: number;
    }
  /**
   * Every byte the tap copied is counted once: in the agent (see Counters) as mirrored, ignored
   * (not stream data), dropped in the agent, or still in the agent; and each mirrored byte, once
   * received, in the replay (see ReplayStats) as replayed, dropped, skipped or pending. So when
   * nothing is in flight (`bytesInAgent` and `bytesPending` 0, `bytesMirrored` =
   * `bytesReceived`): bytesCopied = bytesReplayed + (bytesDropped + bytesDroppedAgent) +
   * (bytesSkipped + bytesIgnored).
   */
  | ({
      event: 'counters';
      target: string;
      ports: number[];
      /** Mirror lag percentiles since the previous counters event (null: nothing replayed). */
      recentLagP50Ms: number | null;
      recentLagP99Ms: number | null;
    } & Counters &
      ReplayStats);

/** The agent counters of a session with nothing counted yet. */
export const NO_COUNTERS: Counters = {
  segmentsCopied: 0,
  bytesCopied: 0,
  segmentsDroppedKernel: 0,
  bytesDroppedKernel: 0,
  connectionsDroppedAgent: 0,
  bytesDroppedAgent: 0,
  connectionsOpen: 0,
  bytesMirrored: 0,
  bytesIgnored: 0,
  bytesInAgent: 0,
};

/**
 * The counts of an agent that is gone added to those of the agents before it: a session that
 * followed its target to a new pod reports what it mirrored over its whole life. Its open
 * connections ended with it; what it still held (`bytesInAgent`) was lost with it and stays
 * counted there.
 */
function addCounters(earlier: Counters, gone: Counters): Counters {
  const sum = { ...earlier };
  for (const key of Object.keys(sum) as (keyof Counters)[]) sum[key] += gone[key];
  sum.connectionsOpen = 0;
  return sum;
}

/** Where to reach an app's listener from this machine: a wildcard bind is reached on loopback. */
function destinationOf(listener: AppListener): ReplayDestination {
  const wildcard = listener.address === '0.0.0.0' || listener.address === '::';
  return { host: wildcard ? '127.0.0.1' : listener.address, port: listener.localPort };
}

export interface MirroredTrafficOptions {
  /** Remote port → local port, given by the user; they win over what the layer reports. */
  ports: Map<number, number>;
  /** Remote ports never mirrored, even when the app listens on them. */
  ignorePorts: Set<number>;
  midStream: boolean;
  /**
   * The app's layer: the ports the app listens on are mirrored too, and its accept() reports
   * each replayed connection's original client. Without it (no app), only `ports` are.
   */
  layer?: LayerChannel;
  /** Human-readable notes (stderr). */
  log(line: string): void;
  emit(event: MirrorEvent): void;
}

/**
 * The target's traffic on this machine: routed to the app's listeners and replayed there, over
 * the session's whole life, through each agent it had (see start and follow).
 */
export class MirroredTraffic {
  readonly #options: MirroredTrafficOptions;
  /** Remote port → the app's listener. */
  readonly #routes = new Map<number, ReplayDestination>();
  /** The current agent's session: a port the app starts listening on is subscribed there. */
  #session: AgentClient;
  #target: string;
  /**
   * Made before the first subscription: the agent may send a connection's `opened` in the same
   * read as the acknowledgement of its port's subscription, and a replay made after it would
   * miss that connection and its first bytes.
   */
  readonly #replay: Replay;
  /**
   * Events of the replay until the session is ready (see start and follow): held, so that
   * `ready` still comes first.
   */
  #held: MirrorEvent[] | undefined = [];
  #agentCounters = NO_COUNTERS;
  /** Counted by agents that are gone (see addCounters). */
  #earlierCounters = NO_COUNTERS;
  #listened = false;

  private constructor(session: AgentClient, target: string, options: MirroredTrafficOptions) {
    this.#options = options;
    this.#session = session;
    this.#target = target;
    for (const [remote, local] of options.ports) {
      this.#routes.set(remote, { host: '127.0.0.1', port: local });
    }
    this.#replay = this.#replayFrom(session);
    options.layer?.on('listen', (listener) => this.#onListen(listener));
    options.layer?.on('close', ({ port }) => {
      if (!this.#routes.has(port) || options.ports.has(port)) return;
      this.#routes.delete(port);
      this.#session.unsubscribe(port).catch(() => undefined);
    });
  }

  /**
   * Mirrors `target` through the first agent's `session`: resolves once the tap copies every
   * route, with the replay started.
   */
  static async start(
    session: AgentClient,
    target: string,
    options: MirroredTrafficOptions,
  ): Promise<MirroredTraffic> {
    const mirrored = new MirroredTraffic(session, target, options);
    try {
      await mirrored.#subscribeRoutes(session);
    } catch (error) {
      // What the replay started meanwhile (connections to the app) ends with it.
      await mirrored.#replay.close();
      throw error;
    }
    mirrored.#ready(session);
    return mirrored;
  }

  /** Whether the app listened on any port, mirrored or not. */
  get listened(): boolean {
    return this.#listened;
  }

  /**
   * The agent went away with its target: what it counted joins what the agents before it
   * counted, and its connections ended with it.
   */
  agentGone(): void {
    this.#earlierCounters = addCounters(this.#earlierCounters, this.#agentCounters);
    this.#agentCounters = NO_COUNTERS;
  }

  /**
   * Goes on with a replacement agent's `session` for its `target` (see agentGone): the same
   * routes, subscribed there; the replay's counts and lag go on.
   */
  async follow(session: AgentClient, target: string): Promise<void> {
    this.#target = target;
    this.#held = [];
    // Before subscribing, for the reason the replay is made before the first session's.
    this.#replay.follow(session);
    await this.#subscribeRoutes(session);
    // Only now: a port the app listened on meanwhile was subscribed above (a Map's iteration
    // visits the keys added during it).
    this.#session = session;
    this.#ready(session);
  }

  /**
   * Ends the replay, then reports the session's totals: after the replay closed, so that they
   * include what closing it dropped.
   */
  async close(): Promise<void> {
    await this.#replay.close();
    // Whether or not the last session got ready (a replacement may fail to), all is told.
    this.#release();
    this.#options.emit(this.#countersEvent());
  }

  /** Subscribes every route on `session` and reports its counters from now on. */
  async #subscribeRoutes(session: AgentClient): Promise<void> {
    session.on('counters', (counters) => {
      const { type, ...kernelAndAgent } = counters;
      this.#agentCounters = kernelAndAgent;
      this.#emit(this.#countersEvent());
    });
    for (const remote of this.#routes.keys()) await session.subscribe(remote);
  }

  #ready(session: AgentClient): void {
    // Only now, with every route subscribed, is it true.
    const interfaces = session.agent.interfaces;
    this.#options.log(`mirrord: mirroring ${this.#target} (${interfaces.join(', ')})`);
    this.#options.emit({ event: 'ready', target: this.#target, interfaces });
    this.#release();
  }

  /** Emits the events held until now, and those to come at once. */
  #release(): void {
    const held = this.#held ?? [];
    this.#held = undefined;
    for (const event of held) this.#options.emit(event);
  }

  #emit(event: MirrorEvent): void {
    if (this.#held) this.#held.push(event);
    else this.#options.emit(event);
  }

  #replayFrom(session: AgentClient): Replay {
    const { layer, log } = this.#options;
    const emit = (event: MirrorEvent): void => this.#emit(event);
    const replay = new Replay(session, {
      route: (port) => this.#routes.get(port),
      midStream: this.#options.midStream,
      onConnected: (sourcePort, appPort, original) =>
        layer?.announcePeer(sourcePort, appPort, original),
      onClosed: (sourcePort, appPort) => layer?.forgetPeer(sourcePort, appPort),
    });
    replay.on('connection', (c) =>
      emit({ event: 'opened', id: c.id, client: c.client, server: c.server }),
    );
    replay.on('connectionEnd', (end) => {
      if (end.reason !== 'fin' && end.reason !== 'rst') {
        log(`mirrord: connection ${end.id} ended: ${end.reason}`);
      }
    });
    replay.on('accounted', (account) => {
      const { id, reason, client, server } = account;
      emit(
        account.replayed
          ? {
              event: 'closed',
              id,
              reason,
              bytesMirrored: account.bytesMirrored,
              bytesReplayed: account.bytesReplayed,
              bytesDropped: account.bytesDropped,
            }
          : { event: 'skipped', id, client, server, reason, bytesSkipped: account.bytesSkipped },
      );
    });
    return replay;
  }

  #onListen(listener: AppListener): void {
    const { ports, ignorePorts, log, emit } = this.#options;
    this.#listened = true;
    if (ignorePorts.has(listener.port) || ports.has(listener.port)) return;
    this.#routes.set(listener.port, destinationOf(listener));
    // Announced once the tap copies the port, so that whoever waits for it (the demo starts its
    // traffic then) loses nothing.
    this.#session.subscribe(listener.port).then(
      () => {
        emit({ event: 'listen', port: listener.port, localPort: listener.localPort });
        log(`mirrord: the app listens on ${listener.port}: mirroring it`);
      },
      (error: Error) => log(`mirrord: ${error.message}`),
    );
  }

  /** The counts of the session so far, over every agent it had. */
  #countersEvent(): MirrorEvent {
    const recent = this.#replay.takeRecentLag();
    return {
      event: 'counters',
      target: this.#target,
      ports: [...this.#routes.keys()],
      recentLagP50Ms: recent.lagP50Ms,
      recentLagP99Ms: recent.lagP99Ms,
      ...addCounters(this.#earlierCounters, this.#agentCounters),
      connectionsOpen: this.#agentCounters.connectionsOpen,
      ...this.#replay.stats(),
    };
  }
}
