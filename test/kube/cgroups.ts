import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { netnsName } from '../../src/platform/local/netns.js';
import { CGROUP_ROOT, removeCgroupTree } from '../support/leftovers.js';
import { SANDBOX_PREFIX } from '../support/sandbox.js';

/**
 * The kubelet's cgroups, laid out as the systemd driver with containerd lays them out
 * (`kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/cri-containerd-<id>.scope`),
 * below one root per stand-in cluster named like the test netns (prefix and pid), so that the
 * test hygiene finds a killed run's leftovers. Only the names matter: no controller is enabled.
 */
export class CgroupTree {
  readonly root = join(CGROUP_ROOT, netnsName(SANDBOX_PREFIX, 'kube'));

  constructor() {
    mkdirSync(join(this.root, 'kubepods.slice'), { recursive: true });
  }

  /** Makes the cgroup of one container and returns its directory. */
  createContainer(podUid: string, qosClass: string, containerId: string): string {
    const qos = qosClass.toLowerCase();
    const pod = `kubepods-${qos}-pod${podUid.replaceAll('-', '_')}.slice`;
    const path = join(
      this.root,
      'kubepods.slice',
      `kubepods-${qos}.slice`,
      pod,
      `cri-containerd-${containerId}.scope`,
    );
    mkdirSync(path, { recursive: true });
    return path;
  }

  procs(path: string): number[] {
    try {
      return readFileSync(join(path, 'cgroup.procs'), 'utf8')
        .split('\n')
        .filter(Boolean)
        .map(Number);
    } catch {
      return [];
    }
  }

  signal(path: string, signal: NodeJS.Signals): void {
    for (const pid of this.procs(path)) {
      try {
        process.kill(pid, signal);
      } catch {
        // Exited meanwhile.
      }
    }
  }

  /** SIGKILLs every process of the cgroup at once (cgroup.kill, Linux 5.14+), or one by one. */
  kill(path: string): void {
    try {
      writeFileSync(join(path, 'cgroup.kill'), '1');
    } catch {
      this.signal(path, 'SIGKILL');
    }
  }

  /**
   * Kills what is left in the container's cgroup and removes it, and its pod's slice once that
   * is empty. cgroupfs lets a directory go only once its killed processes are gone: retried for
   * a while.
   */
  async remove(path: string): Promise<void> {
    if (!existsSync(path)) return;
    this.kill(path);
    await removeWhenEmpty(path);
    try {
      rmdirSync(dirname(path));
    } catch {
      // Another container of the pod is still there.
    }
  }

  async close(): Promise<void> {
    if (!existsSync(this.root)) return;
    this.kill(this.root);
    await removeWhenEmpty(this.root);
  }
}

async function removeWhenEmpty(path: string): Promise<void> {
  for (let attempt = 0; ; attempt += 1) {
    try {
      removeCgroupTree(path);
      return;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
      if (attempt >= 200) throw error;
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }
}
