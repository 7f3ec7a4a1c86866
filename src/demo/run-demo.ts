import { join } from 'node:path';
import { packageRoot } from '../package-root.js';
import { placeLocalAgent } from '../platform/local/agent-process.js';
import { runMirror } from '../session/mirror.js';
import { SERVICE_PORT, createStaging, type Answer, type Traffic } from './staging.js';
import { MirrorTally } from './tally.js';

export interface DemoOptions {
  /** Seconds of traffic to mirror; 0 mirrors until interrupted. */
  durationSeconds: number;
  log(line: string): void;
  /** Resolves when the user interrupts (Ctrl-C). */
  interrupted: Promise<void>;
}

export class DemoError extends Error {}

/** The example local app, "your new code", as the repository ships it. */
const APP = join('examples', 'orders-app', 'server.js');

/** How long the app may take to start listening (a busy machine is slow to start Node). */
const LISTEN_LIMIT_S = 60;

/** How long the end waits for mirrored connections still being replayed into the app. */
const DRAIN_LIMIT_MS = 3000;

/**
 * Then a moment for the app to handle what was replayed last: a connection counts as replayed
 * once its bytes are in the app's socket, before the app has read them.
 */
const SETTLE_MS = 250;

/** Staging's answer in the form the example app prints what it handles. */
function describe(answer: Answer): string {
  const request = answer.body ? `${answer.path} ${answer.body}` : answer.path;
  return `staging:   ${answer.method} ${request} from ${answer.from} -> ${answer.status}`;
}

/**
 * The embedded demo: a sandbox "staging" service with its users, and `mirror` from it into the
 * example app, whose own output shows the mirrored requests arriving. Ends after the duration
 * or on Ctrl-C: the users stop, what they sent is replayed to the end, then the app is stopped.
 * Everything it made is removed when it ends, also when something fails.
 */
export async function runDemo(options: DemoOptions): Promise<void> {
  const { log } = options;
  let stopping = false;
  let stop = (): void => undefined;
  const stopAsked = new Promise<void>((resolve) => {
    stop = resolve;
    void options.interrupted.then(resolve);
  }).then(() => {
    stopping = true;
  });

  log('mirrord demo: creating a sandbox "staging" on this machine');
  const staging = await createStaging();
  let timer: NodeJS.Timeout | undefined;
  let failure: string | undefined;
  let traffic: Traffic | undefined;
  let answered = 0;
  const tally = new MirrorTally();
  try {
    if (stopping) return;
    log(
      `  staging:   an orders service at ${staging.serviceAddress}:${SERVICE_PORT} in netns ${staging.netns},`,
    );
    log(`             and its users, a traffic generator at ${staging.clientAddress}`);
    log(`  local app: ${APP}, your new code (a newer version: compare its answers),`);
    log('             under mirrord: every request staging gets is replayed into it');
    log(
      options.durationSeconds > 0
        ? `  mirrors ${options.durationSeconds} s of traffic; Ctrl-C stops it sooner`
        : '  mirrors until Ctrl-C',
    );
    // A guard against an app that never listens: nothing would be mirrored, and the demo with
    // a duration would never end.
    timer = setTimeout(() => {
      failure = `the local app (${APP}) did not listen within ${LISTEN_LIMIT_S} s`;
      stop();
    }, LISTEN_LIMIT_S * 1000);
    const code = await runMirror({
      placeAgent: placeLocalAgent({ netns: staging.netns }),
      command: [process.execPath, join(packageRoot(), APP), String(SERVICE_PORT)],
      ports: new Map(),
      ignorePorts: new Set(),
      midStream: false,
      log,
      onEvent: (event) => {
        tally.record(event);
        // The users start once the app's port is mirrored: without mid-stream mirroring, a
        // keep-alive connection opened before would never reach the app.
        if (event.event === 'listen' && !traffic && !stopping) {
          traffic = staging.startTraffic((answer) => {
            answered += 1;
            log(describe(answer));
          });
          // The duration counts from here: setting up takes a while on a busy machine.
          clearTimeout(timer);
          if (options.durationSeconds > 0) timer = setTimeout(stop, options.durationSeconds * 1000);
        }
      },
      interrupted: stopAsked.then(async () => {
        await tally.drained((await traffic?.stop()) ?? 0, DRAIN_LIMIT_MS);
        await new Promise((resolve) => setTimeout(resolve, SETTLE_MS));
      }),
    });
    // Also when the app ended first: the count covers every answer staging gave.
    await traffic?.stop();
    if (failure) throw new DemoError(failure);
    // Stopped before it set up its signal handlers, the app ends by the signal: not a failure.
    if (code !== 0 && !stopping) {
      throw new DemoError(`the local app (${APP}) exited with code ${code}`);
    }
    log(`staging answered ${answered} requests; ${tally.summary()}`);
  } finally {
    clearTimeout(timer);
    staging.destroy();
    log('mirrord demo: removed the sandbox (its netns, service and users; the agent and app)');
  }
}
