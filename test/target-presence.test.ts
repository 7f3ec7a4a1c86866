/**
 * The agent's check that its target is still there (src/agent/target.ts), on real namespaces.
 * The kernel names a network namespace by an inode number, and gives a freed number to the next
 * namespace made (here within about 50 ms). A pod deleted and replaced at once (a StatefulSet's)
 * or a netns deleted and made again under its name must still count as gone.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { readlinkSync, statSync } from 'node:fs';
import { targetPresence } from '../src/agent/target.js';
import { deleteNetns, netnsName } from '../src/platform/local/netns.js';
import { SANDBOX_PREFIX } from './support/sandbox.js';
import { waitFor } from './support/wait.js';

/** How long new namespaces are made after the target's went: 40 times the reuse seen here. */
const REUSE_WINDOW_MS = 2000;

function netnsOf(pid: number): string | undefined {
  try {
    return readlinkSync(`/proc/${pid}/ns/net`);
  } catch {
    return undefined;
  }
}

function numberOf(netns: string): number {
  return statSync(`/run/netns/${netns}`).ino;
}

describe('whether the target is still there', () => {
  const processes: ChildProcess[] = [];
  const named: string[] = [];

  afterEach(() => {
    for (const child of processes.splice(0)) child.kill('SIGKILL');
    for (const name of named.splice(0)) deleteNetns(name);
  });

  /** A process alone in a new network namespace, as a pod's are; resolves once it is in it. */
  async function inNewNetns(): Promise<ChildProcess> {
    const child = spawn('unshare', ['--net', 'sleep', 'infinity'], { stdio: 'ignore' });
    processes.push(child);
    const own = netnsOf(process.pid);
    await waitFor('unshare to enter its namespace', () => {
      const netns = netnsOf(child.pid!);
      return netns !== undefined && netns !== own;
    });
    return child;
  }

  test('a pod whose processes all exited is gone, though the next namespace made takes its number', async () => {
    const pod = await inNewNetns();
    const number = netnsOf(pod.pid!);
    const presence = targetPresence({ containerId: 'c0ffee'.repeat(10) }, { pid: pod.pid! });
    try {
      expect(presence.gone()).toBeUndefined();
      pod.kill('SIGKILL');
      await new Promise((resolve) => pod.once('exit', resolve));

      // Replacements, one after another, as kubelet makes them; each keeps its namespace.
      const made: string[] = [];
      const until = Date.now() + REUSE_WINDOW_MS;
      while (Date.now() < until && !made.includes(number!)) {
        made.push(netnsOf((await inNewNetns()).pid!)!);
      }
      expect(made).not.toContain(number);
      expect(presence.gone()).toBe(
        'no process is left in its pod’s network namespace: the pod was deleted or stopped',
      );
    } finally {
      presence.close();
    }
  });

  test('a named netns deleted is gone, though it is made again under its name at once', async () => {
    const name = netnsName(SANDBOX_PREFIX, 'presence');
    named.push(name);
    execFileSync('ip', ['netns', 'add', name]);
    const number = numberOf(name);
    const presence = targetPresence({ netns: name }, { netns: name });
    try {
      expect(presence.gone()).toBeUndefined();
      const made: number[] = [];
      const until = Date.now() + REUSE_WINDOW_MS;
      while (Date.now() < until && !made.includes(number)) {
        execFileSync('ip', ['netns', 'del', name]);
        execFileSync('ip', ['netns', 'add', name]);
        made.push(numberOf(name));
      }
      expect(made).not.toContain(number);
      expect(presence.gone()).toBe(`network namespace ${name} was deleted`);
    } finally {
      presence.close();
    }
  });
});
