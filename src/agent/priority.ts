import { readdirSync } from 'node:fs';
import { setPriority } from 'node:os';

/** The nice value of the agent's threads: the lowest priority there is. */
export const AGENT_NICE = 19;

/**
 * Puts every thread of this process behind the other work of its node (nice 19), so that the
 * target preempts the agent whenever it wants the CPU, and the agent mirrors with what the
 * target leaves. The price, on a node the target saturates for longer than the ring buffer
 * holds, is data the kernel could not copy: counted and shown, never the target's latency.
 * Threads started later (the ring's consumer) inherit the value from the thread that starts
 * them. setpriority(2) on a thread id changes that thread alone, hence one call per thread.
 */
export function yieldToTarget(): void {
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      setPriority(Number(tid), AGENT_NICE);
    } catch {
      // The thread ended meanwhile.
    }
  }
}
