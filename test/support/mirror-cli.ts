/**
 * Running `mirrord mirror` as a user does, for the end-to-end tests: the real CLI as a child
 * process, its `--json` events, and the checks that it left nothing behind.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { packageRoot } from '../../src/package-root.js';
import type { Sandbox } from './sandbox.js';
import { waitFor } from './wait.js';

// From the package root, not this file: benchmarks run it compiled, from .bench-out.
const ROOT = packageRoot();
export const CLI = join(ROOT, 'bin', 'run.js');
export const FIXTURES = join(ROOT, 'test', 'fixtures');
export const LAYER = join(ROOT, 'layer', '.output', 'mirrord_layer.so');

/** One `mirror --json` event (see MirrorEvent in src/features/mirror/cli.ts). */
export interface MirrorEventLine {
  event: string;
  [key: string]: unknown;
}

export interface MirrorRun {
  child: ChildProcess;
  /** stdout: the events and whatever the app prints there. */
  stdout(): string;
  /** stdout and stderr, for messages. */
  output(): string;
  /** The `--json` events so far, in order. */
  events(): MirrorEventLine[];
  exited: Promise<number | null>;
}

export interface MirrorOptions {
  cwd?: string;
  /** Open files allowed to mirror and to the app it starts (prlimit), for many connections. */
  nofile?: number;
  /** Variables added to the CLI's environment. */
  env?: Record<string, string>;
  /** The command: `mirror` (default), or `session` for a process started by the test. */
  command?: 'mirror' | 'session';
  /** The CLI's stdin: none (default), or a pipe the test holds (`child.stdin`). */
  stdin?: 'ignore' | 'pipe';
}

/** Starts `mirrord mirror ARGS` (or another session command, see MirrorOptions). */
export function mirrord(args: string[], options: MirrorOptions = {}): MirrorRun {
  const command = [process.execPath, CLI, options.command ?? 'mirror', ...args];
  const [file, ...rest] = options.nofile
    ? ['prlimit', `--nofile=${options.nofile}:${options.nofile}`, '--', ...command]
    : command;
  const child = spawn(file!, rest, {
    stdio: [options.stdin ?? 'ignore', 'pipe', 'pipe'],
    cwd: options.cwd,
    env: { ...process.env, ...options.env },
  });
  let stdout = '';
  let all = '';
  child.stdout!.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
    all += chunk.toString();
  });
  child.stderr!.on('data', (chunk: Buffer) => (all += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return {
    child,
    stdout: () => stdout,
    output: () => all,
    events: () =>
      // The last line may still be arriving: only whole lines count.
      stdout
        .slice(0, stdout.lastIndexOf('\n') + 1)
        .split('\n')
        .filter((line) => line.startsWith('{"event"'))
        .map((line) => JSON.parse(line) as MirrorEventLine),
    exited,
  };
}

/** `mirrord mirror --netns TARGET --json -- COMMAND…`: a local app mirrored from a sandbox target. */
export function mirrorInto(
  target: string,
  command: string[],
  options: MirrorOptions = {},
): MirrorRun {
  return mirrord(['--netns', target, '--json', '--', ...command], options);
}

/**
 * Stops a run and waits for it, for clean-up after a failure: SIGINT first, so that mirror stops
 * its app and agent; SIGKILL if it does not exit within 10 s.
 */
export async function killRun(run: MirrorRun): Promise<void> {
  if (run.child.exitCode !== null || run.child.signalCode !== null) return;
  run.child.kill('SIGINT');
  const timer = setTimeout(() => run.child.kill('SIGKILL'), 10_000);
  await run.exited;
  clearTimeout(timer);
}

/** Waits until `check` holds; throws with `what` after `ms`. */
export async function until(check: () => boolean, what: string, ms = 30_000): Promise<void> {
  await waitFor(what, check, { ms });
}

/** The same for an async `check`, whose failure counts as not yet. */
export async function untilAsync(
  check: () => Promise<boolean>,
  what: string,
  ms = 30_000,
): Promise<void> {
  await waitFor(what, () => check().catch(() => false), { ms, everyMs: 100 });
}

/**
 * What `run` printed, for a failure message: a session prints its counters every second, and
 * only the last of them is kept, so that the lines that tell what happened are not buried.
 */
function printed(run: MirrorRun): string {
  const lines = run.output().split('\n');
  const counters = (line: string): boolean => line.startsWith('{"event":"counters"');
  const last = lines.findLastIndex(counters);
  return lines.filter((line, index) => index === last || !counters(line)).join('\n');
}

/**
 * The same while `run` is expected to keep running: if it exits first, fails at once with what
 * it printed; if the time runs out, fails with what it printed so far.
 */
export async function untilWhileRunning(
  run: MirrorRun,
  check: () => boolean,
  what: string,
  ms = 30_000,
): Promise<void> {
  await until(
    () => {
      if (check()) return true;
      if (run.child.exitCode !== null || run.child.signalCode !== null) {
        throw new Error(
          `mirror exited (${run.child.exitCode ?? run.child.signalCode}) before ${what}:\n${printed(run)}`,
        );
      }
      return false;
    },
    what,
    ms,
  ).catch((error: Error) => {
    throw new Error(`${error.message}; mirror printed so far:\n${printed(run)}`);
  });
}

/**
 * Resolves once connections to the target's `port` are replayed: after the app's listen event,
 * empty probe connections from the client netns until one shows up as `opened` (the tap copies
 * the port only once the agent acknowledged the subscription). The probes carry no bytes.
 */
export async function untilMirroring(
  run: MirrorRun,
  sandbox: Sandbox,
  port: number,
): Promise<void> {
  const opened = (): boolean =>
    run.events().some((e) => e.event === 'opened' && (e.server as { port: number }).port === port);
  await untilWhileRunning(
    run,
    () => run.events().some((e) => e.event === 'listen' && e.port === port),
    `the app to listen on ${port}`,
  );
  // Each check sends a probe and waits up to a second for it to show.
  await waitFor(
    `a connection to ${port} to be mirrored`,
    async () => {
      await sandbox.runAsync(sandbox.client, 'bash', [
        '-c',
        `exec 3<>/dev/tcp/${sandbox.targetAddress}/${port}`,
      ]);
      await untilWhileRunning(run, opened, 'the probe', 1_000).catch((error: Error) => {
        if (!error.message.startsWith('timed out')) throw error;
      });
      return opened();
    },
    { ms: 30_000, everyMs: 0 },
  );
}

/**
 * Waits until `count()` reaches `wanted`, or until it has not grown for `idleMs` (then the caller
 * compares and reports what is missing, rather than a bare timeout).
 */
export async function untilCountOrStuck(
  count: () => number,
  wanted: number,
  idleMs = 15_000,
): Promise<void> {
  let last = count();
  let since = Date.now();
  // Not a deadline: the wait ends when the count stops growing, however long it grew.
  await waitFor(
    `the count to reach ${wanted} or stop growing`,
    () => {
      const now = count();
      if (now !== last) [last, since] = [now, Date.now()];
      return now >= wanted || Date.now() - since > idleMs;
    },
    { ms: Infinity, everyMs: 100 },
  );
}

/** opened events of connections to `port`, and the closed events among them. */
export function connectionsOn(
  run: MirrorRun,
  port: number,
): { opened: MirrorEventLine[]; closed: MirrorEventLine[] } {
  const events = run.events();
  const opened = events.filter(
    (e) => e.event === 'opened' && (e.server as { port: number }).port === port,
  );
  const ids = new Set(opened.map((e) => e.id));
  return { opened, closed: events.filter((e) => e.event === 'closed' && ids.has(e.id)) };
}

/** Resolves once something accepts connections on 127.0.0.1:port. */
export async function listening(port: number): Promise<void> {
  const connects = (): Promise<boolean> =>
    new Promise<boolean>((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => resolve(true));
      socket.on('error', () => resolve(false));
      socket.on('connect', () => socket.destroy());
    });
  await waitFor(`something to listen on 127.0.0.1:${port}`, connects, { ms: 10_000 });
}

/** Processes whose command line contains `pattern` (pgrep -f), as pids. */
export function processesMatching(pattern: string): string[] {
  try {
    return execFileSync('pgrep', ['-f', '--', pattern], { encoding: 'utf8' })
      .split('\n')
      .filter(Boolean);
  } catch {
    return [];
  }
}

/** SIGKILLs the processes `processesMatching(pattern)` finds: for clean-up after a failure. */
export function killMatching(pattern: string): void {
  for (const pid of processesMatching(pattern)) {
    try {
      process.kill(Number(pid), 'SIGKILL');
    } catch {
      // Gone meanwhile.
    }
  }
}

/** Agents still running for this sandbox's target: there must be none once mirror exits. */
export function agentsOf(target: string): string[] {
  return processesMatching(`agent --netns ${target}`);
}

/** Network namespaces that exist now (ip netns), to see that a run added none. */
export function netnsList(): string[] {
  return execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' })
    .split('\n')
    .map((line) => line.split(' ')[0] ?? '')
    .filter(Boolean)
    .sort();
}

/** A private temporary directory. */
export function tempDir(label: string): { path: string; remove(): void } {
  const path = mkdtempSync(join(tmpdir(), `mirrord-${label}-`));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

/** The lines of a log file written a line per write (missing file: none yet). */
export function logLines(file: string): string[] {
  try {
    return readFileSync(file, 'utf8').split('\n').filter(Boolean);
  } catch {
    return [];
  }
}

/**
 * Groups log lines by their first field (the client's address:port, i.e. one connection) and
 * keeps each connection's lines in order.
 */
export function byConnection(lines: string[]): Map<string, string[]> {
  const connections = new Map<string, string[]>();
  for (const line of lines) {
    const key = line.split(' ')[0] ?? '';
    connections.set(key, [...(connections.get(key) ?? []), line]);
  }
  return connections;
}

/** A Map as a plain sorted object, for readable toEqual diffs. */
export function sortedRecord<V>(map: Map<string, V>): Record<string, V> {
  return Object.fromEntries([...map.entries()].sort(([a], [b]) => a.localeCompare(b)));
}
