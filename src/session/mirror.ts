import type { ResultPromise } from 'execa';
import { KILL_ALL, execaGuarded, startFailure } from '../platform/local/guarded.js';
import type { AgentPlacer, PlacedAgent } from '../platform/placed-agent.js';
import { AgentClient, AgentClientError } from '../protocol/client.js';
import type { EnvironmentSource } from '../features/env/cli.js';
import type { AppEnvironment } from '../features/env/selection.js';
import { RemoteFiles } from '../features/files/cli.js';
import { serveAppFiles } from '../features/files/layer.js';
import { layerFsEnvironment, type FsSettings } from '../features/files/policy.js';
import { RemoteOutgoing } from '../features/outgoing/cli.js';
import { serveAppOutgoing } from '../features/outgoing/layer.js';
import { layerOutgoingEnvironment, type OutgoingSettings } from '../features/outgoing/policy.js';
import { MirroredTraffic, type MirrorEvent } from '../features/mirror/cli.js';
import { joinEnvironment, joinedExit } from './joined.js';
import { LayerChannel } from './layer-channel.js';

export interface MirrorOptions {
  /** Brings the agent next to the target (see src/platform/). */
  placeAgent: AgentPlacer;
  /** The local app and its arguments; without one (nor `join`), only `ports` are replayed. */
  command?: string[];
  /**
   * Instead of `command`: the app is started by someone else (an editor's debugger), with the
   * environment `join` is given. The session then lasts until the processes that joined it
   * have exited (see joined.ts), or until it is interrupted.
   */
  join?(environment: Record<string, string>): void;
  /** Remote port → local port, given by the user; they win over what the layer reports. */
  ports: Map<number, number>;
  /** Remote ports never mirrored, even when the app listens on them. */
  ignorePorts: Set<number>;
  midStream: boolean;
  /** The app's environment (see src/features/env/); without it, the CLI's own. */
  appEnvironment?: EnvironmentSource;
  /** Which of the app's paths are the target's (see src/features/files/); default: none. */
  files?: FsSettings;
  /** Which of the app's destinations go through the target (src/features/outgoing/); default: none. */
  outgoing?: OutgoingSettings;
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

/** How long the app has to exit after SIGTERM before it and every process it started are killed. */
const STOP_GRACE_MS = 5000;
/** An app still running this long after SIGTERM is said to be waited for. */
const STOP_NOTICE_MS = 1000;

/** Why a session with an agent ended, for a sentence (the agent may have given no reason). */
function endOfSession(error: Error | undefined): string {
  return error ? error.message : 'the agent ended the session';
}

/**
 * One mirroring session on this machine: an agent on the target, the local app under the layer,
 * and the features between them: mirroring (src/features/mirror/), the app's environment and
 * its files. When the target goes away and the platform can find its replacement (a workload's
 * new pod), the session follows it with a new agent; otherwise the session ends, and so does the
 * app. Resolves with the app's exit code when it ended by itself, 130 after an interrupt, 1 when
 * the session with the agent ended. Everything it started is stopped before it returns, also on
 * failure.
 */
export async function runMirror(options: MirrorOptions): Promise<number> {
  const { log } = options;
  const progress = (note: string) => log(`mirrord: ${note}`);
  let agent: PlacedAgent | undefined;
  let session: AgentClient | undefined;
  let layer: LayerChannel | undefined;
  let mirrored: MirroredTraffic | undefined;
  let features: AppFeatures | undefined;
  try {
    agent = await options.placeAgent(progress);
    let ended: Promise<Error | undefined>;
    ({ session, ended } = await startSession(agent, log));
    layer = options.command || options.join ? await LayerChannel.open() : undefined;
    mirrored = await MirroredTraffic.start(session, agent.target, {
      ports: options.ports,
      ignorePorts: options.ignorePorts,
      midStream: options.midStream,
      layer,
      log,
      emit: options.onEvent ?? (() => undefined),
    });
    features = layer ? await serveAppFeatures(layer, session, agent.target, options) : undefined;
    const [file = '', ...args] = options.command ?? [];
    const environment = layer && (await appEnvironmentFrom(session, agent.target, options));
    const layerSettings = features?.layerSettings ?? {};
    const app =
      layer && options.command
        ? startApp(file, args, { layer, environment, layerSettings, output: options.appOutput })
        : undefined;
    const appEnded = app ?? new Promise<never>(() => undefined);
    let joinedEnded = new Promise<number[]>(() => undefined);
    if (layer && options.join) {
      joinedEnded = joinedExit(layer);
      options.join(joinEnvironment(layer, layerSettings, environment?.env));
    }

    for (;;) {
      const outcome = await Promise.race([
        appEnded.then((result) => ({ app: result })),
        options.interrupted.then(() => ({ interrupted: true as const })),
        ended.then((error) => ({ sessionEnd: error })),
        joinedEnded.then((pids) => ({ joined: pids })),
      ]);
      if ('joined' in outcome) {
        const pids = outcome.joined.join(', ');
        log(`mirrord: the processes that joined the session exited (pid ${pids}): it ends`);
        return 0;
      }
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
        mirrored.agentGone();
        await replaced.stop();
        agent = await options.placeAgent(progress, replaced);
        ({ session, ended } = await startSession(agent, log));
        await mirrored.follow(session, agent.target);
        features?.follow(session);
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
      if (!mirrored.listened) {
        // Otherwise the session would end with only its totals, all zero, and no reason.
        log(
          `mirrord: ${file} ${endOf(outcome.app)} and never listened on a port: nothing was mirrored`,
        );
      }
      return outcome.app.exitCode ?? 1;
    }
  } finally {
    // The totals, whatever ended the session (see MirroredTraffic.close).
    await mirrored?.close();
    features?.close();
    await session?.close();
    await agent?.stop();
    await layer?.close();
  }
}

/** The app's files and outgoing connections, served through the current session's agent. */
interface AppFeatures {
  /** The layer's settings of each feature, for the app's environment. */
  layerSettings: Record<string, string>;
  /**
   * The session followed its target to a new agent: from now on the app reads the
   * replacement's files and connects from it (calls in flight on the previous one fail as I/O
   * errors, connections through it are reset, as they would be anyway).
   */
  follow(session: AgentClient): void;
  close(): void;
}

/** Serves the features the options ask for to the app's processes on `layer`. */
async function serveAppFeatures(
  layer: LayerChannel,
  session: AgentClient,
  target: string,
  options: MirrorOptions,
): Promise<AppFeatures> {
  const { log } = options;
  const appOutgoing = options.outgoing ? layerOutgoingEnvironment(options.outgoing) : {};
  const appFiles = options.files
    ? layerFsEnvironment(options.files, process.cwd(), options.outgoing?.enabled ?? false)
    : {};
  let files = new RemoteFiles(session);
  if (appFiles.MIRRORD_FS) serveAppFiles(layer, () => files, log);
  let outgoing = new RemoteOutgoing(session, log);
  let relays: { close(): void } | undefined;
  if (appOutgoing.MIRRORD_OUTGOING) {
    relays = await serveAppOutgoing(layer, () => outgoing, log);
    log(
      `mirrord: the app's outgoing connections leave from ${target}: a mirrored request that writes to a shared backend (a database, a queue) writes twice, once by the target and once by the app; keep such a backend local with --outgoing-local HOST[:PORT], or use --no-outgoing`,
    );
  }
  return {
    layerSettings: { ...appFiles, ...appOutgoing },
    follow: (next) => {
      files = new RemoteFiles(next);
      outgoing = new RemoteOutgoing(next, log);
    },
    close: () => relays?.close(),
  };
}

/**
 * Opens the session with a placed agent; resolves once the handshake is done, with a promise of
 * the session's end (and why, when it failed).
 */
async function startSession(
  placed: PlacedAgent,
  log: (line: string) => void,
): Promise<{ session: AgentClient; ended: Promise<Error | undefined> }> {
  const session = await AgentClient.start(await placed.connect(), {
    clientName: 'mirrord mirror',
    secret: placed.secret,
  });
  let failure: Error | undefined;
  session.on('error', (error) => (failure = error));
  const ended = new Promise<Error | undefined>((resolve) =>
    session.once('end', () => resolve(failure)),
  );
  session.on('warning', (warning) => log(`mirrord: the agent warns: ${warning.message}`));
  return { session, ended };
}

/**
 * The environment the app starts with when the options ask for the target's (told on stderr);
 * undefined: the CLI's own.
 */
async function appEnvironmentFrom(
  session: AgentClient,
  target: string,
  options: MirrorOptions,
): Promise<AppEnvironment | undefined> {
  const environment = await options.appEnvironment?.(session).catch((error: Error) => {
    throw new MirrorError(
      `cannot give the app the target's environment: ${error.message} (--no-env starts it with the local one)`,
    );
  });
  if (environment) {
    const names = environment.fromTarget;
    options.log(
      `mirrord: the app gets ${names.length} variable${names.length === 1 ? '' : 's'} from ${target}${names.length ? ` (${abbreviate(names)})` : ''}`,
    );
  }
  return environment;
}

/** What the app is started with, besides its command. */
interface AppStart {
  layer: LayerChannel;
  environment: AppEnvironment | undefined;
  /** The layer's settings of each feature (layerFsEnvironment, layerOutgoingEnvironment). */
  layerSettings: Record<string, string>;
  output: AppOutput | undefined;
}

/** Starts the app under the layer. */
function startApp(
  file: string,
  args: string[],
  { layer, environment, layerSettings, output }: AppStart,
): ResultPromise {
  // Under the guard: the app and its workers must not outlive the CLI (see guarded.ts).
  const app = execaGuarded(file, args, {
    stdin: 'inherit',
    stdout: output?.stdout ? 'pipe' : 'inherit',
    stderr: output?.stderr ? 'pipe' : 'inherit',
    // Handed over as it comes (see handAppOutput), never kept.
    buffer: { stdout: false, stderr: false },
    // With the target's, the environment is the one appEnvironment made (it holds the local
    // variables it kept), not added to the CLI's own.
    extendEnv: environment === undefined,
    env: { ...environment?.env, ...layerSettings, ...layer.variables() },
  });
  if (output) handAppOutput(app, output);
  return app;
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
