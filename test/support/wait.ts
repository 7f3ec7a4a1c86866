/**
 * Waiting for a condition in tests and benchmarks, the one way: `check` runs at once and again
 * `everyMs` after each run that did not hold, until it returns a truthy value (resolved with it)
 * or the deadline passes (a WaitTimeout naming what was waited for). An error `check` throws
 * ends the wait with it. Conditions such as "no process of the app is left" or "the API server
 * lists the pod" have no event to wait on, so they are checked again; nothing waits a fixed time
 * instead.
 */
export class WaitTimeout extends Error {}

export interface WaitOptions {
  /** The deadline, from now (default 30 s). */
  ms?: number;
  /** Between a check that did not hold and the next (default 50 ms). */
  everyMs?: number;
}

/** What a wait resolves with: the check's value, which held. */
export type Held<T> = Exclude<T, false | 0 | '' | null | undefined>;

export function waitFor<T>(
  what: string,
  check: () => T | Promise<T>,
  { ms = 30_000, everyMs = 50 }: WaitOptions = {},
): Promise<Held<T>> {
  const deadline = Date.now() + ms;
  return new Promise<Held<T>>((resolve, reject) => {
    const attempt = (): void => {
      Promise.resolve()
        .then(check)
        .then((value) => {
          if (value) resolve(value as Held<T>);
          else if (Date.now() > deadline) {
            reject(new WaitTimeout(`timed out after ${ms / 1000} s waiting for ${what}`));
          } else setTimeout(attempt, everyMs);
        }, reject);
    };
    attempt();
  });
}
