import { execa, type Result, type ResultPromise } from 'execa';
import { join } from 'node:path';
import { packageRoot } from '../../package-root.js';

/** The guard (layer/guard.c, built by `make -C layer`). */
export function guardPath(): string {
  return join(packageRoot(), 'layer', '.output', 'mirrord-guard');
}

/** Sent to a guard: SIGKILL its program and every process below it, now. */
export const KILL_ALL = 'SIGUSR1';

export interface GuardedOptions {
  stdin: 'inherit' | 'ignore' | 'pipe';
  stdout: 'inherit' | 'ignore' | 'pipe';
  stderr: 'inherit' | 'ignore' | 'pipe';
  /** Added to this process's environment, or with `extendEnv: false` the whole of it. */
  env?: Record<string, string>;
  extendEnv?: boolean;
  /** Keep stdout and stderr (false: the caller reads them as they come). */
  buffer?: boolean | { stdout?: boolean; stderr?: boolean };
  /** SIGKILL the guard, hence the program, this long after a kill() (default: never). */
  forceKillAfterDelay?: number | false;
}

/**
 * Starts `file args` under mirrord-guard, so that it cannot outlive this process: when this
 * process dies without stopping it (kill -9, a crash), the guard SIGTERMs the program and every
 * process below it (its workers, daemonized ones too), and SIGKILLs what is left after 5 s. See
 * layer/guard.c for why a guard process and not the layer or PR_SET_PDEATHSIG alone.
 *
 * The guard passes SIGTERM on to the program and exits as the program does; `kill(KILL_ALL)`
 * kills the program's whole tree. Its fd 3 is the line to this process: its hang-up is how the
 * guard learns that this process is gone, and the guard says there why it could not start the
 * program (see {@link startFailure}).
 */
export function execaGuarded(file: string, args: string[], options: GuardedOptions): ResultPromise {
  const { stdin, stdout, stderr, ...rest } = options;
  return execa(guardPath(), ['--', file, ...args], {
    // The caller decides when to give up on SIGTERM (and then kills the whole tree).
    forceKillAfterDelay: false,
    ...rest,
    stdio: [stdin, stdout, stderr, 'pipe'],
    reject: false,
  }) as unknown as ResultPromise;
}

/**
 * Why a guarded program could not be started, or undefined when it was: `code` is the errno
 * name (ENOENT: no such command; EACCES: not executable).
 */
export function startFailure(result: Result): { code: string; message: string } | undefined {
  if (result.failed && result.exitCode === undefined && result.signal === undefined) {
    // Neither an exit nor a signal: the guard itself could not be spawned.
    const { code = 'failed' } = result as { code?: string };
    return { code: 'EGUARD', message: `${guardPath()} did not start (${code}): run npm run build` };
  }
  const said = String((result.stdio as unknown[])[3] ?? '');
  const match = /^exec failed: (\w+): (.*)$/m.exec(said);
  return match ? { code: match[1]!, message: match[2]! } : undefined;
}
