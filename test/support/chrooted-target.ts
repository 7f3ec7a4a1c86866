/**
 * A target whose files only it has, as a pod's are: a process chrooted in `root` inside a mount
 * namespace of its own, with this machine's /usr bound in (its programs and libraries) and
 * whatever `inside` mounts there (a tmpfs, /proc). Used by the files tests and benchmark.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync, readlinkSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { waitFor } from './wait.js';

/**
 * Makes `root` (its usr, and lib links into it), then starts `sleep` chrooted there once the
 * shell commands of `inside` ran in the new namespace; resolves when it runs.
 */
export async function startChrootedTarget(root: string, inside: string[]): Promise<ChildProcess> {
  mkdirSync(join(root, 'usr'), { recursive: true });
  symlinkSync('usr/lib', join(root, 'lib'));
  symlinkSync('usr/lib64', join(root, 'lib64'));
  const script = [
    `mount --rbind /usr ${root}/usr`,
    ...inside,
    `exec chroot ${root} /usr/bin/sleep 3600`,
  ].join(' && ');
  const target = spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', script], {
    stdio: 'ignore',
  });
  try {
    await waitFor(
      'the target to run chrooted',
      () => {
        try {
          return readlinkSync(`/proc/${target.pid}/root`) === root;
        } catch {
          return target.exitCode !== null ? Promise.reject(new Error('the target exited')) : false;
        }
      },
      { ms: 60_000 },
    );
  } catch (error) {
    target.kill('SIGKILL');
    throw error;
  }
  return target;
}
