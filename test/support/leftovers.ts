import { existsSync, readFileSync, readdirSync, rmSync, rmdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deleteNetns } from '../../src/platform/local/netns.js';
import { SANDBOX_PREFIX, listTestNetns } from './sandbox.js';

/** Files `ip netns exec` lays over /etc, by netns name. */
const ETC_NETNS = '/etc/netns';

/** Where tests make the cgroups that stand for containers (cgroup v2, hybrid or pure). */
export const CGROUP_ROOT = existsSync('/sys/fs/cgroup/unified/cgroup.procs')
  ? '/sys/fs/cgroup/unified'
  : '/sys/fs/cgroup';

export function listTestCgroups(): string[] {
  return readdirSync(CGROUP_ROOT).filter((name) => name.startsWith(SANDBOX_PREFIX));
}

/** Removes a cgroup tree bottom-up: cgroupfs only lets empty leaves go. */
export function removeCgroupTree(path: string): void {
  for (const entry of readdirSync(path, { withFileTypes: true })) {
    if (entry.isDirectory()) removeCgroupTree(join(path, entry.name));
  }
  rmdirSync(path);
}

/**
 * A test editor's state (code-server and its browser, test/support/code-server.ts) is a
 * directory in the temporary directory named `mirrord-test-editor-PID-N`.
 */
export const EDITOR_PREFIX = `${SANDBOX_PREFIX}-editor`;

/**
 * Every process of a test editor carries this variable, set to its state directory's name: the
 * extension host's terminals and debugged programs leave code-server's process group, and
 * outlive it when it is killed, but keep their environment.
 */
export const EDITOR_MARK = 'MIRRORD_TEST_EDITOR';

/** The processes that carry EDITOR_MARK, by pid, with its value. */
export function editorProcesses(): Map<number, string> {
  const found = new Map<number, string>();
  const mark = `${EDITOR_MARK}=`;
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const variable = readFileSync(`/proc/${entry}/environ`, 'latin1')
        .split('\0')
        .find((v) => v.startsWith(mark));
      if (variable) found.set(Number(entry), variable.slice(mark.length));
    } catch {
      // Gone meanwhile.
    }
  }
  return found;
}

/** Kills the processes of the test editors `select` picks and removes their state. */
function removeEditors(select: (name: string) => boolean): string[] {
  // A process's mark is taken only in this form: it is removed as a directory.
  const picked = (name: string): boolean =>
    new RegExp(`^${EDITOR_PREFIX}-\\d+-\\d+$`).test(name) && select(name);
  const processes = [...editorProcesses()].filter(([, name]) => picked(name));
  for (const [pid] of processes) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // Gone meanwhile.
    }
  }
  const names = new Set([
    ...readdirSync(tmpdir()).filter(picked),
    ...processes.map(([, name]) => name),
  ]);
  for (const name of names) {
    rmSync(join(tmpdir(), name), { recursive: true, force: true, maxRetries: 3 });
  }
  return [...names].map((name) => `editor ${name}`);
}

/**
 * Removes the test editors, namespaces and cgroups that `select` picks and returns their names.
 * A cgroup whose processes were killed with their netns or editor may linger a moment; the next
 * run removes it.
 */
export function removeLeftovers(select: (name: string) => boolean): string[] {
  // First: an editor's processes (a debugged program, what it started) may be in the others.
  const editors = removeEditors(select);
  const netns = listTestNetns().filter(select);
  const cgroups = listTestCgroups().filter(select);
  for (const name of netns) deleteNetns(name);
  for (const cgroup of cgroups) {
    try {
      removeCgroupTree(join(CGROUP_ROOT, cgroup));
    } catch {
      // Still busy; see above.
    }
  }
  // What `ip netns exec` lays over /etc for a test netns (the outgoing tests' hosts and
  // resolv.conf) goes with it.
  const etc = existsSync(ETC_NETNS)
    ? readdirSync(ETC_NETNS).filter(
        (name) =>
          name.startsWith(SANDBOX_PREFIX) && select(name) && !listTestNetns().includes(name),
      )
    : [];
  for (const name of etc) rmSync(join(ETC_NETNS, name), { recursive: true, force: true });
  return [
    ...editors,
    ...netns.map((n) => `netns ${n}`),
    ...cgroups.map((c) => `cgroup ${c}`),
    ...etc.map((e) => `${ETC_NETNS}/${e}`),
  ];
}
