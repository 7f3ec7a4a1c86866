/** The processes a run started, from /proc: to see that none outlives it; a run to its end. */
import { spawn } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { WaitTimeout, waitFor } from './wait.js';

/** What a process is running, or undefined once it is gone (a zombie has no command line). */
export function commandLine(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ').trim() || undefined;
  } catch {
    return undefined;
  }
}

/** Every process below `root`, by pid, with its command line. */
export function descendants(root: number): Map<number, string> {
  const children = new Map<number, number[]>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      // The parent pid is the second field after the command name, which may hold spaces.
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(entry)]);
    } catch {
      // Gone meanwhile.
    }
  }
  const found = new Map<number, string>();
  const queue = [root];
  for (let pid = queue.pop(); pid !== undefined; pid = queue.pop()) {
    for (const child of children.get(pid) ?? []) {
      const command = commandLine(child);
      if (command) found.set(child, command);
      queue.push(child);
    }
  }
  return found;
}

/**
 * Resolves once none of `processes` runs any more (a pid that now runs another command is
 * another process); returns the command lines of those still running at `ms`.
 */
export async function stillRunning(processes: Map<number, string>, ms = 10_000): Promise<string[]> {
  const left = (): string[] =>
    [...processes].filter(([pid, command]) => commandLine(pid) === command).map(([, c]) => c);
  await waitFor('the processes to end', () => left().length === 0, { ms, everyMs: 100 }).catch(
    (error: unknown) => {
      if (!(error instanceof WaitTimeout)) throw error;
    },
  );
  return left();
}

/** SIGKILLs those of `processes` still running: clean-up after a failed test. */
export function killAll(processes: Map<number, string>): void {
  for (const [pid, command] of processes) {
    if (commandLine(pid) !== command) continue;
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Gone meanwhile.
    }
  }
}

/** What a program printed and how it exited. */
export interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `file ARGS` with `env` to its end (killed after a minute). */
export function runToEnd(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}
