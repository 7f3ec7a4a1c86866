import net from 'node:net';
import { hostname } from 'node:os';
import { AgentSession } from '../protocol/server.js';
import { CAPABILITIES } from '../protocol/messages.js';
import { agentFeatures } from '../features/agent.js';
import { FeatureHost } from '../features/host.js';
import { Streams } from '../protocol/streams.js';
import { TargetTraffic, type TargetTrafficOptions } from '../features/mirror/agent.js';
import { deferToTarget } from './tap.js';
import { describeNodeTarget, tapNetnsOf, targetPresence } from './target.js';
import type { AgentReadiness, NodeTarget } from '../protocol/agent-launch.js';

/** Where and for whom the agent listens, and how it taps (TargetTrafficOptions). */
export interface AgentOptions extends TargetTrafficOptions {
  target: NodeTarget;
  host: string;
  port: number;
  /** How long to wait for a session before exiting. */
  idleTimeoutMs: number;
  /** What a client must present to be admitted (see src/protocol/agent-launch.ts). */
  secret: string;
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

/**
 * Attaches the tap to the target, then serves exactly one session: mirroring (the target's
 * traffic, src/features/mirror/agent.ts) and the request features (src/features/agent.ts). The
 * agent ends with its session, or when none arrives in time, or when the target goes away.
 */
export async function startAgent(options: AgentOptions): Promise<RunningAgent> {
  const targetName = describeNodeTarget(options.target);
  let session: AgentSession | undefined;
  let streams: Streams | undefined;
  const tapNetns = tapNetnsOf(options.target);
  const features = agentFeatures(
    { netns: tapNetns, name: targetName },
    (code, message) => session?.sendWarning(code, message),
    () => {
      if (!streams) throw new Error('no session');
      return streams;
    },
  );
  deferToTarget();
  const traffic = new TargetTraffic(tapNetns, options);
  const presence = targetPresence(options.target, tapNetns);

  let finish!: (exit: AgentExit) => void;
  const done = new Promise<AgentExit>((resolve) => (finish = resolve));
  const server = net.createServer();
  const sweeper = setInterval(() => {
    traffic.sweep();
    const gone = presence.gone();
    if (gone) {
      end({ error: `the target went away: ${gone}` }, { code: 'target-gone', message: gone });
    }
  }, SWEEP_INTERVAL_MS);
  let ended = false;
  /** Ends the agent; with `fatal`, the session is told that error first. */
  const end = (exit: AgentExit, fatal?: { code: string; message: string }): void => {
    if (ended) return;
    ended = true;
    clearInterval(sweeper);
    presence.close();
    clearTimeout(idleTimer);
    traffic.close();
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
      interfaces: traffic.interfaces,
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
        traffic.serve(accepted);
        const host = new FeatureHost(features, accepted);
        streams = new Streams(accepted, (total) =>
          accepted.sendWarning(
            'datagrams-dropped',
            `dropped ${total} UDP datagrams to the app so far: the session was behind`,
          ),
        );
        const sessionStreams = streams;
        accepted.on('request', (id, feature, body) => host.request(id, feature, body));
        accepted.on('stream', (message) => sessionStreams.receive(message));
        accepted.on('end', (error) => {
          session = undefined;
          // The CLI is gone: the target's ends of the app's connections are reset.
          sessionStreams.resetAll();
          void host.close();
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
      interfaces: traffic.interfaces,
      attachMode: traffic.attachMode,
    },
    done,
    stop: () => end({}),
  };
}
