/** The agent's side of the `env` feature: the target process's environment. */
import { readFile } from 'node:fs/promises';
import type { Variables } from './messages.js';

/**
 * The environment the target process started with (`/proc/PID/environ`): what its container
 * got from the pod spec, ConfigMaps, Secrets, the downward API and Services. A variable the
 * process set for itself later is not there, as for `ps e`: no other process can see it.
 */
export async function targetEnvironment(pid: number): Promise<Variables> {
  let raw: string;
  try {
    raw = await readFile(`/proc/${pid}/environ`, 'utf8');
  } catch (error) {
    throw new Error(
      `cannot read the environment of pid ${pid}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`,
    );
  }
  const variables: Variables = [];
  for (const entry of raw.split('\0')) {
    const equals = entry.indexOf('=');
    // An entry without `=` is not a variable; getenv() would not find it either.
    if (equals > 0) variables.push([entry.slice(0, equals), entry.slice(equals + 1)]);
  }
  return variables;
}
