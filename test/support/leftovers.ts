import { existsSync, readdirSync, rmSync, rmdirSync } from 'node:fs';
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
 * Removes the test namespaces and cgroups that `select` picks and returns their names. A cgroup
 * whose processes were killed with their netns may linger a moment; the next run removes it.
 */
export function removeLeftovers(select: (name: string) => boolean): string[] {
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
    ...netns.map((n) => `netns ${n}`),
    ...cgroups.map((c) => `cgroup ${c}`),
    ...etc.map((e) => `${ETC_NETNS}/${e}`),
  ];
}
