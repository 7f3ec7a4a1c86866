/**
 * One `mirrord session` process: started for a target, it places the agent and prints the
 * environment the debuggee joins it with, then the session's events, until it is stopped or the
 * debuggee exits.
 */
import { EventEmitter } from 'node:events';
import { createInterface } from 'node:readline';
import { CliError, cliLines, run, startFailure, type Cli } from './cli';

/** The CLI's counters event, in the fields the status bar shows. */
export interface Counters {
  target: string;
  connectionsOpen: number;
  opened: number;
  bytesMirrored: number;
  bytesDropped: number;
  bytesDroppedAgent: number;
  bytesDroppedKernel: number;
  recentLagP99Ms: number | null;
}

export interface SessionEvents {
  /** A line for the output channel: the CLI's notes and its events. */
  line: [string];
  counters: [Counters];
  /** A one-line error of the CLI (its `error` event), with what to do. */
  error: [string];
  /** The process ended; `code` null: killed by a signal. */
  end: [code: number | null];
}

/** How long a stopped session has to remove its agent before it is killed. */
const STOP_GRACE_MS = 30_000;

export class MirrordSession extends EventEmitter<SessionEvents> {
  readonly #child;
  readonly #ended: Promise<void>;
  /** Resolves with the environment the debuggee joins the session with. */
  readonly joined: Promise<Record<string, string>>;
  /** The last error line the CLI gave, for a failure before the join. */
  #lastError: string | undefined;
  #lastNote: string | undefined;

  constructor(cli: Cli, targetArgs: string[], cwd: string | undefined) {
    super();
    this.#child = run(cli, ['session', ...targetArgs], cwd);
    // stdin stays open: the CLI ends the session when it closes, as it does when the extension
    // host is gone.
    this.#ended = new Promise((resolve) => this.#child.once('close', () => resolve()));
    this.joined = new Promise((resolve, reject) => {
      const events = createInterface({ input: this.#child.stdout });
      events.on('line', (line) => {
        const event = parse(line);
        if (!event) return;
        if (event.event === 'join') resolve(event.env as Record<string, string>);
        else this.#onEvent(event);
      });
      createInterface({ input: this.#child.stderr }).on('line', (line) => {
        this.emit('line', line);
        this.#lastNote = cliLines(line)[0] ?? this.#lastNote;
      });
      this.#child.once('error', (error: NodeJS.ErrnoException) => {
        this.#lastError = startFailure(cli, error);
        this.emit('error', this.#lastError);
      });
      this.#child.once('close', (code) => {
        reject(
          new CliError(
            this.#lastError ?? this.#lastNote ?? `mirrord session ended (exit code ${code})`,
          ),
        );
        this.emit('end', code);
      });
    });
    // Its failure is told through the `error` event; a caller that never waits for the join
    // (the session was stopped first) must not see an unhandled rejection.
    this.joined.catch(() => undefined);
  }

  #onEvent(event: Record<string, unknown>): void {
    if (event.event === 'error' && typeof event.message === 'string') {
      this.#lastError = event.message;
      this.emit('error', event.message);
      return;
    }
    if (event.event === 'counters') {
      this.emit('counters', event as unknown as Counters);
      return;
    }
    this.emit('line', JSON.stringify(event));
  }

  /** Ends the session (its agent is removed) and resolves once the CLI exited. */
  async stop(): Promise<void> {
    if (this.#child.exitCode === null && this.#child.signalCode === null) {
      this.#child.kill('SIGTERM');
      const killer = setTimeout(() => this.#child.kill('SIGKILL'), STOP_GRACE_MS);
      await this.#ended;
      clearTimeout(killer);
    }
  }
}

function parse(line: string): Record<string, unknown> | undefined {
  try {
    const value: unknown = JSON.parse(line);
    return typeof value === 'object' && value !== null
      ? (value as Record<string, unknown>)
      : undefined;
  } catch {
    return undefined;
  }
}
