import type { ResultPromise } from 'execa';
import { KILL_ALL, execaGuarded, startFailure } from '../platform/local/guarded.js';
import type { AgentPlacer, PlacedAgent } from '../platform/placed-agent.js';
import { layerPath } from '../package-root.js';
import { AgentClient, AgentClientError } from '../protocol/client.js';
import type { Counters, Endpoint } from '../protocol/messages.js';
import type { EnvironmentSource } from '../features/env/cli.js';
import { RemoteFiles } from '../features/files/cli.js';
import { serveAppFiles } from '../features/files/layer.js';
import { layerFsEnvironment, type FsSettings } from '../features/files/policy.js';
import { LayerChannel, type AppListener } from './layer-channel.js';
import { Replay, type ReplayStats, type ReplayDestination } from './replay.js';

export interface MirrorOptions {
  /** Brings the agent next to the target (see src/platform/). */
  placeAgent: AgentPlacer;
  /** The local app and its arguments; without one, only `ports` are replayed. */
  command?: string[];
  /** Remote port → local port, given by the user; they win over what the layer reports. */
  ports: Map<number, number>;
  /** Remote ports never mirrored, even when the app listens on them. */
  ignorePorts: Set<number>;
  midStream: boolean;
  /** The app's environment (see src/features/env/); without it, the CLI's own. */
  appEnvironment?: EnvironmentSource;
  /** Which of the app's paths are the target's (see src/features/files/); default: none. */
  files?: FsSettings;
  /** Human-readable notes (stderr). */
  log(line: string): void;
  /** What happens, for --json and the status line. */
  onEvent?(event: MirrorEvent): void;
  /** The app's output streams the caller takes; without it, the app inherits the CLI's. */
  appOutput?: AppOutput;
  /** Resolves when the user interrupts (Ctrl-C). */
  interrupted: Promise<void>;
}

export class MirrorError extends Error {}

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

/** How long the app has to exit after SIGTERM before it and every process it started are killed. */
const STOP_GRACE_MS = 5000;
/** An app still running this long after SIGTERM is said to be waited for. */
const STOP_NOTICE_MS = 1000;

/** Where to reach an app's listener from this machine: a wildcard bind is reached on loopback. */
function destinationOf(listener: AppListener): ReplayDestination {
  const wildcard = listener.address === '0.0.0.0' || listener.address === '::';
  return { host: wildcard ? '127.0.0.1' : listener.address, port: listener.localPort };
}

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

/** Why a session with an agent ended, for a sentence (the agent may have given no reason). */
function endOfSession(error: Error | undefined): string {
  return error ? error.message : 'the agent ended the session';
}

/**
 * One mirroring session on this machine: an agent on the target, the local app under the layer,
 * and the replay between them. When the target goes away and the platform can find its
 * replacement (a workload's new pod), the session follows it with a new agent; otherwise the
 * session ends, and so does the app. Resolves with the app's exit code when it ended by itself,
 * 130 after an interrupt, 1 when the session with the agent ended. Everything it started is
 * stopped before it returns, also on failure.
 */
export async function runMirror(options: MirrorOptions): Promise<number> {
  const { log } = options;
  const progress = (note: string) => log(`mirrord: ${note}`);
  const emit = options.onEvent ?? (() => undefined);
  const routes = new Map<number, ReplayDestination>();
  for (const [remote, local] of options.ports)
    routes.set(remote, { host: '127.0.0.1', port: local });

  let agent: PlacedAgent | undefined;
  let client: AgentClient | undefined;
  let channel: LayerChannel | undefined;
  let replay: Replay | undefined;
  let agentCounters = NO_COUNTERS;
  /** Counted by agents that are gone (see addCounters). */
  let earlierCounters = NO_COUNTERS;
  const countersEvent = (from: Replay): MirrorEvent => {
    const recent = from.takeRecentLag();
    return {
      event: 'counters',
      target: agent?.target ?? '',
      ports: [...routes.keys()],
      recentLagP50Ms: recent.lagP50Ms,
      recentLagP99Ms: recent.lagP99Ms,
      ...addCounters(earlierCounters, agentCounters),
      connectionsOpen: agentCounters.connectionsOpen,
      ...from.stats(),
    };
  };

  /**
   * Opens the session with a placed agent and subscribes every route; resolves once the tap
   * copies them, with a promise of the session's end (and why, when it failed).
   */
  const startSession = async (placed: PlacedAgent) => {
    const session = await AgentClient.start(await placed.connect(), {
      clientName: 'mirrord mirror',
      secret: placed.secret,
    });
    client = session;
    let failure: Error | undefined;
    session.on('error', (error) => (failure = error));
    const ended = new Promise<Error | undefined>((resolve) =>
      session.once('end', () => resolve(failure)),
    );
    session.on('warning', (warning) => log(`mirrord: the agent warns: ${warning.message}`));
    session.on('counters', (counters) => {
      const { type, ...kernelAndAgent } = counters;
      agentCounters = kernelAndAgent;
      if (replay) emit(countersEvent(replay));
    });
    for (const remote of routes.keys()) await session.subscribe(remote);
    return { session, ended };
  };

  try {
    agent = await options.placeAgent(progress);
    let { session, ended } = await startSession(agent);
    const ready = (placed: PlacedAgent, interfaces: string[]) => {
      // Only now, with every route subscribed, is it true.
      log(`mirrord: mirroring ${placed.target} (${interfaces.join(', ')})`);
      emit({ event: 'ready', target: placed.target, interfaces });
    };
    ready(agent, session.agent.interfaces);

    const layer = options.command ? await LayerChannel.open() : undefined;
    channel = layer;
    replay = new Replay(session, {
      route: (port) => routes.get(port),
      midStream: options.midStream,
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

    let listened = false;
    layer?.on('listen', (listener) => {
      listened = true;
      if (options.ignorePorts.has(listener.port) || options.ports.has(listener.port)) return;
      routes.set(listener.port, destinationOf(listener));
      // Announced once the tap copies the port, so that whoever waits for it (the demo starts
      // its traffic then) loses nothing.
      session.subscribe(listener.port).then(
        () => {
          emit({ event: 'listen', port: listener.port, localPort: listener.localPort });
          log(`mirrord: the app listens on ${listener.port}: mirroring it`);
        },
        (error: Error) => log(`mirrord: ${error.message}`),
      );
    });
    layer?.on('close', ({ port }) => {
      if (!routes.has(port) || options.ports.has(port)) return;
      routes.delete(port);
      session.unsubscribe(port).catch(() => undefined);
    });

    let app: ResultPromise | undefined;
    let file = '';
    if (options.command && layer) {
      const [command = '', ...args] = options.command;
      file = command;
      const environment = await options.appEnvironment?.(session).catch((error: Error) => {
        throw new MirrorError(
          `cannot give the app the target's environment: ${error.message} (--no-env starts it with the local one)`,
        );
      });
      if (environment) {
        const names = environment.fromTarget;
        progress(
          `the app gets ${names.length} variable${names.length === 1 ? '' : 's'} from ${agent.target}${names.length ? ` (${abbreviate(names)})` : ''}`,
        );
      }
      const preload = [layerPath(), process.env.LD_PRELOAD].filter(Boolean).join(':');
      // The target's files for the app, through this session's agent (a replacement agent's
      // session is not followed: files opened before it stay as they were read).
      const appFiles = options.files ? layerFsEnvironment(options.files, process.cwd()) : {};
      if (appFiles.MIRRORD_FS) serveAppFiles(layer, new RemoteFiles(session), log);
      // Under the guard: the app and its workers must not outlive the CLI (see guarded.ts).
      const output = options.appOutput;
      app = execaGuarded(file, args, {
        stdin: 'inherit',
        stdout: output?.stdout ? 'pipe' : 'inherit',
        stderr: output?.stderr ? 'pipe' : 'inherit',
        // Handed over as it comes (see handAppOutput), never kept.
        buffer: { stdout: false, stderr: false },
        // With the target's, the environment is the one appEnvironment made (it holds the
        // local variables it kept), not added to the CLI's own.
        extendEnv: environment === undefined,
        env: {
          ...environment?.env,
          ...appFiles,
          LD_PRELOAD: preload,
          MIRRORD_LAYER_SOCKET: layer.path,
          MIRRORD_LAYER_TOKEN: layer.token,
        },
      });
      if (output) handAppOutput(app, output);
    }
    const appEnded = app ?? new Promise<never>(() => undefined);

    for (;;) {
      const outcome = await Promise.race([
        appEnded.then((result) => ({ app: result })),
        options.interrupted.then(() => ({ interrupted: true as const })),
        ended.then((error) => ({ sessionEnd: error })),
      ]);
      if ('interrupted' in outcome) {
        // One rule for every command (README, "Errors and exit codes"): interrupted is 130,
        // whatever the app answered to its SIGTERM.
        if (app) await stopApp(app, file, log);
        return 130;
      }
      if ('sessionEnd' in outcome) {
        const error = outcome.sessionEnd;
        const gone = error instanceof AgentClientError && error.agent?.code === 'target-gone';
        if (!gone || !agent.replaceable) {
          log(
            gone
              ? `mirrord: ${agent.target} went away (${error.agent?.message}): the session ended`
              : `mirrord: session failed: ${endOfSession(error)}`,
          );
          if (app) await stopApp(app, file, log);
          return 1;
        }
        const goneAt = Date.now();
        const replaced = agent;
        log(
          `mirrord: ${replaced.target} went away (${error.agent?.message}): waiting for its replacement`,
        );
        earlierCounters = addCounters(earlierCounters, agentCounters);
        agentCounters = NO_COUNTERS;
        await replaced.stop();
        agent = await options.placeAgent(progress, replaced);
        ({ session, ended } = await startSession(agent));
        replay.follow(session);
        ready(agent, session.agent.interfaces);
        const gap = ((Date.now() - goneAt) / 1000).toFixed(1);
        log(
          `mirrord: connections that reached the target in the ${gap} s between were not mirrored`,
        );
        continue;
      }
      const failure = startFailure(outcome.app);
      if (failure) {
        throw new MirrorError(
          failure.code === 'ENOENT'
            ? `command not found: ${file} (check the name, or give its full path)`
            : `could not start ${file}: ${failure.message}`,
        );
      }
      if (!listened) {
        // Otherwise the session would end with only its totals, all zero, and no reason.
        log(
          `mirrord: ${file} ${endOf(outcome.app)} and never listened on a port: nothing was mirrored`,
        );
      }
      return outcome.app.exitCode ?? 1;
    }
  } finally {
    // The totals, whatever ended the session: after the replay closed, so that they include
    // what closing it dropped.
    await replay?.close();
    if (replay) {
      options.onEvent?.(countersEvent(replay));
    }
    await client?.close();
    await agent?.stop();
    await channel?.close();
  }
}

/** A list of names for a line: the first few, and how many more. */
function abbreviate(names: string[]): string {
  const shown = names.slice(0, 5).join(', ');
  return names.length > 5 ? `${shown} and ${names.length - 5} more` : shown;
}

/** How an app ended, for a sentence: "exited with code 0", "was killed by SIGSEGV". */
function endOf(result: { exitCode?: number; signal?: string }): string {
  return result.signal ? `was killed by ${result.signal}` : `exited with code ${result.exitCode}`;
}

/**
 * Stops the app as a user expects of Ctrl-C: SIGTERM, and its own shutdown is waited for; an
 * app that ignores it is said to be waited for, then killed with every process it started.
 */
async function stopApp(
  app: ResultPromise,
  file: string,
  log: (line: string) => void,
): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const within = (ms: number) =>
    Promise.race([
      app,
      new Promise<undefined>((resolve) => (timer = setTimeout(resolve, ms, undefined))),
    ]).finally(() => clearTimeout(timer));
  app.kill('SIGTERM');
  let result = await within(STOP_NOTICE_MS);
  if (!result) {
    const left = (STOP_GRACE_MS - STOP_NOTICE_MS) / 1000;
    log(`mirrord: waiting for ${file} to exit after SIGTERM (it is killed in ${left} s)`);
    result = await within(STOP_GRACE_MS - STOP_NOTICE_MS);
  }
  if (!result) {
    app.kill(KILL_ALL);
    result = await app;
    log(
      `mirrord: ${file} did not exit within ${STOP_GRACE_MS / 1000} s of SIGTERM: killed it and every process it started (SIGKILL)`,
    );
  }
}

/**
 * The app's output for a caller that draws on the same terminal (mirror's status line): the
 * streams marked true are piped to `write`, chunk by chunk as the app writes them; the others
 * are the CLI's own, inherited.
 */
export interface AppOutput {
  stdout: boolean;
  stderr: boolean;
  write(from: 'stdout' | 'stderr', chunk: Buffer): void;
}

/**
 * How long the app's pipes may stay open after it exited: a process it left running (a
 * daemon) can hold them for ever, and the app's end must not wait for that. What the app wrote
 * before it exited is in the pipe already, and read well within this.
 */
const OUTPUT_AFTER_EXIT_MS = 500;

/**
 * Passes the app's piped output to `output`. The app's result (execa) comes once its pipes
 * ended, so a caller that awaits it has had all of the app's output: the last line follows it.
 */
function handAppOutput(app: ResultPromise, output: AppOutput): void {
  const pipes = [
    ['stdout', app.stdout],
    ['stderr', app.stderr],
  ] as const;
  for (const [from, pipe] of pipes) pipe?.on('data', (chunk: Buffer) => output.write(from, chunk));
  app.once('exit', () => {
    // unref: pipes that ended by themselves leave nothing to wait for.
    setTimeout(() => {
      for (const [, pipe] of pipes) pipe?.destroy();
    }, OUTPUT_AFTER_EXIT_MS).unref();
  });
}
