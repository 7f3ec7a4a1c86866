import net from 'node:net';
import { hostname } from 'node:os';
import { AgentSession } from '../protocol/server.js';
import { CAPABILITIES, type CloseReason, type Counters } from '../protocol/messages.js';
import { agentFeatures } from '../features/agent.js';
import { FeatureHost } from '../features/host.js';
import { Outbox } from './outbox.js';
import { Reassembler, type ReassemblyLimits } from './reassembly.js';
import { Tap, TapError, deferToTarget, type TapOptions } from './tap.js';
import { describeNodeTarget, tapNetnsOf, targetPresence } from './target.js';
import type { AgentReadiness, NodeTarget } from '../protocol/agent-launch.js';

export interface AgentOptions {
  target: NodeTarget;
  host: string;
  port: number;
  /** How long to wait for a session before exiting. */
  idleTimeoutMs: number;
  /** What a client must present to be admitted (see src/protocol/agent-launch.ts). */
  secret: string;
  tap?: TapOptions;
  reassembly?: Partial<ReassemblyLimits>;
  /**
   * Bytes that may wait for the CLI before the agent drops connections rather than send more
   * (default 4 MiB): dropping whole connections, reported, keeps the others exact.
   */
  maxBacklogBytes?: number;
}

/** Why the agent ended: `error` is set when it ended because something went wrong. */
export interface AgentExit {
  error?: string;
}

export interface RunningAgent {
  readiness: AgentReadiness;
  done: Promise<AgentExit>;
  /** Detaches everything and ends the session. */
  stop(): void;
}

const AGENT_NAME = `mirrord-agent on ${hostname()}`;
const SWEEP_INTERVAL_MS = 1_000;
/** Session backlog above which the tap is paused until the backlog is written. */
const PAUSE_TAP_ABOVE_BYTES = 1024 * 1024;

/**
 * Attaches the tap to the target, then serves exactly one session: the session's subscriptions
 * drive the tap's port map, the tap's segments go through the reassembler, and the reassembled
 * streams go to the session. The agent ends with its session, or when none arrives in time.
 */
export async function startAgent(options: AgentOptions): Promise<RunningAgent> {
  const targetName = describeNodeTarget(options.target);
  const maxBacklogBytes = options.maxBacklogBytes ?? 4 * 1024 * 1024;
  let session: AgentSession | undefined;
  let now = Date.now();
  const outbox = new Outbox(maxBacklogBytes);
  let segmentTapMicros = 0;
  let tapPaused = false;

  // Called only for segments, so after `tap` below is assigned.
  const interfaceName = (ifindex: number): string =>
    tap.interfaces.find((i) => i.ifindex === ifindex)?.name ?? `if${ifindex}`;

  const reassembler = new Reassembler(
    {
      opened(connection) {
        session?.sendOpened({
          id: connection.id,
          family: connection.family,
          client: { address: connection.clientAddress, port: connection.clientPort },
          server: { address: connection.serverAddress, port: connection.serverPort },
          interface: interfaceName(connection.ifindex),
          midStream: connection.midStream,
        });
      },
      data(id, bytes) {
        if (session) outbox.data(id, bytes, segmentTapMicros);
        else outbox.discard(bytes.length);
      },
      closed(id: number, reason: CloseReason, gapBytes: number) {
        if (session) outbox.closed(session, id, reason, gapBytes);
      },
    },
    options.reassembly,
  );

  const tapNetns = tapNetnsOf(options.target);
  const features = agentFeatures(
    { pid: 'pid' in tapNetns ? tapNetns.pid : undefined, name: targetName },
    (code, message) => session?.sendWarning(code, message),
  );
  const targetGone = targetPresence(options.target, tapNetns);
  deferToTarget();
  const tap = Tap.open(
    tapNetns,
    {
      onSegment: (segment) => {
        // The reassembler delivers bytes only while it takes a segment: they are stamped with
        // that segment's time, the moment the target itself could have read them in order.
        segmentTapMicros = segment.tapMicros;
        reassembler.push(segment, now);
      },
      onBatchEnd: () => {
        now = Date.now();
        if (!session) return;
        outbox.flush(session);
        session.flush();
        // The CLI is behind: rather than drop connections, let the ring buffer (8 MiB by
        // default) absorb the burst until the session has written its backlog.
        if (session.backlogBytes > PAUSE_TAP_ABOVE_BYTES && !tapPaused) {
          tapPaused = true;
          tap.pause();
          session.once('drain', () => {
            tapPaused = false;
            tap.resume();
          });
        }
      },
    },
    options.tap,
  );
  const interfaceNames = tap.interfaces.map((i) => i.name);

  const counters = (): Counters => {
    const kernel = tap.counters();
    return {
      segmentsCopied: kernel.segmentsCopied,
      bytesCopied: kernel.bytesCopied,
      segmentsDroppedKernel: kernel.segmentsDropped,
      bytesDroppedKernel: kernel.bytesDropped,
      connectionsDroppedAgent: outbox.drops.connections,
      bytesDroppedAgent: outbox.drops.bytes + reassembler.droppedBytes,
      connectionsOpen: reassembler.connectionCount,
      bytesMirrored: outbox.sentBytes,
      bytesIgnored: reassembler.ignoredBytes,
      // Counted apart from the three above: it is 0 only when every byte the kernel copied was
      // taken from the ring buffer and went somewhere (see Counters).
      bytesInAgent:
        kernel.bytesCopied -
        reassembler.pushedBytes +
        reassembler.bufferedBytes +
        outbox.pendingBytes,
    };
  };

  let finish!: (exit: AgentExit) => void;
  const done = new Promise<AgentExit>((resolve) => (finish = resolve));
  const server = net.createServer();
  const sweeper = setInterval(() => {
    now = Date.now();
    reassembler.sweep(now);
    if (session) {
      session.sendCounters(counters());
      session.flush();
    }
    const gone = targetGone();
    if (gone) {
      // What was copied before the target went is still delivered; the counters just sent
      // count it.
      if (session) outbox.flush(session);
      end({ error: `the target went away: ${gone}` }, { code: 'target-gone', message: gone });
    }
  }, SWEEP_INTERVAL_MS);
  let ended = false;
  /** Ends the agent; with `fatal`, the session is told that error first. */
  const end = (exit: AgentExit, fatal?: { code: string; message: string }): void => {
    if (ended) return;
    ended = true;
    clearInterval(sweeper);
    clearTimeout(idleTimer);
    tap.close();
    session?.close(fatal);
    server.close();
    finish(exit);
  };
  const idleTimer = setTimeout(
    () => end({ error: `no session arrived within ${options.idleTimeoutMs / 1000} s` }),
    options.idleTimeoutMs,
  );

  server.on('connection', (socket) => {
    if (session || ended) {
      // One agent, one session: a second CLI would silently steal half the streams.
      socket.end();
      return;
    }
    // Several may be in their handshake at once (one of them the CLI, racing someone who
    // found the port): the first with the secret gets the session, the others are refused or
    // ended, and none of them uses up the agent's one session or its idle timeout.
    AgentSession.accept(socket, {
      agent: AGENT_NAME,
      target: targetName,
      interfaces: interfaceNames,
      secret: options.secret,
      capabilities: [...CAPABILITIES, ...features.keys()],
    }).then(
      (accepted) => {
        if (session || ended) {
          accepted.close();
          return;
        }
        clearTimeout(idleTimer);
        session = accepted;
        accepted.on('subscribe', (port) => {
          try {
            tap.subscribe(port);
          } catch (error) {
            // The tap's map could not be updated: this port is not mirrored, the others are.
            if (!(error instanceof TapError)) throw error;
            accepted.failSubscribe(port, error.message);
            return;
          }
          accepted.ackSubscribe(port);
        });
        accepted.on('unsubscribe', (port) => {
          try {
            tap.unsubscribe(port);
          } catch (error) {
            // The port stays copied; the CLI, which no longer routes it, counts what arrives
            // as skipped.
            if (!(error instanceof TapError)) throw error;
            accepted.sendWarning('unsubscribe-failed', error.message);
          }
          accepted.ackUnsubscribe(port);
        });
        const host = new FeatureHost(features, accepted);
        accepted.on('request', (id, feature, body) => host.request(id, feature, body));
        accepted.on('end', (error) => {
          session = undefined;
          void host.close();
          outbox.clear();
          end(error ? { error: `session ended: ${error.message}` } : {});
        });
      },
      (error: Error) => {
        // The refused client was told why; the agent waits on for its CLI.
        process.stderr.write(`agent: refused a session: ${error.message}\n`);
      },
    );
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', (error) => {
      end({ error: error.message });
      reject(error);
    });
    server.listen(options.port, options.host, () => resolve());
  });
  const address = server.address() as net.AddressInfo;
  return {
    readiness: {
      ready: true,
      address: address.address,
      port: address.port,
      target: targetName,
      interfaces: interfaceNames,
      attachMode: tap.attachMode,
    },
    done,
    stop: () => end({}),
  };
}
