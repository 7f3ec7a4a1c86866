import { existsSync, readdirSync, readFileSync } from 'node:fs';
import type { TapTarget } from './tap.js';

/** A target as the user named it: a process, a named netns, or a container of a pod. */
export type TargetSpec = { pid: number } | { netns: string } | { containerId: string };

export class TargetError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
  }
}

/**
 * Container runtimes report IDs as `containerd://<hex>`, `cri-o://<hex>` or `docker://<hex>`;
 * the cgroup path holds only the hex part, so the scheme is dropped.
 */
export function parseContainerId(raw: string): string {
  const id = raw.replace(/^[a-z-]+:\/\//, '').toLowerCase();
  if (!/^[0-9a-f]{12,64}$/.test(id)) {
    throw new TargetError(
      `container id "${raw}" is not a container id: expected 12 to 64 hex digits, optionally with a runtime prefix such as containerd://`,
      'EBADCONTAINERID',
    );
  }
  return id;
}

/**
 * Finds a process of the container by scanning `/proc/*\/cgroup`. Every process of a pod shares
 * the pod's network namespace, so any one will do; the lowest PID (usually the container's init)
 * is chosen so that repeated runs agree. The id must end a path segment or be followed by a
 * runtime suffix, so that a short id cannot match the middle of another one.
 */
export function findContainerPid(containerId: string, procRoot = '/proc'): number {
  const id = parseContainerId(containerId);
  const pattern = new RegExp(`(^|[/:-])${id}[0-9a-f]*(\\.scope)?$`, 'm');
  const pids = readdirSync(procRoot)
    .filter((name) => /^\d+$/.test(name))
    .map(Number)
    .sort((a, b) => a - b);
  for (const pid of pids) {
    let cgroups: string;
    try {
      cgroups = readFileSync(`${procRoot}/${pid}/cgroup`, 'utf8');
    } catch {
      continue;
    }
    if (pattern.test(cgroups)) return pid;
  }
  throw new TargetError(
    `no process of container ${id} found in ${procRoot}/*/cgroup: is the container running on this node, and does the agent run with hostPID?`,
    'ENOCONTAINER',
  );
}

/** Turns what the user named into what the tap attaches to, checking that it exists. */
export function resolveTarget(spec: TargetSpec): TapTarget {
  if ('containerId' in spec) return { pid: findContainerPid(spec.containerId) };
  if ('pid' in spec) {
    if (!Number.isInteger(spec.pid) || spec.pid <= 0) {
      throw new TargetError(`pid ${spec.pid} is not a process id`, 'EBADPID');
    }
    if (!existsSync(`/proc/${spec.pid}/ns/net`)) {
      throw new TargetError(
        `process ${spec.pid} does not exist: check the pid with ps`,
        'ENOPROCESS',
      );
    }
    return { pid: spec.pid };
  }
  if (!existsSync(`/run/netns/${spec.netns}`)) {
    throw new TargetError(
      `network namespace "${spec.netns}" does not exist: see ip netns list`,
      'ENONETNS',
    );
  }
  return { netns: spec.netns };
}

/** A short human name for the target, for readiness lines and the handshake. */
export function describeTarget(spec: TargetSpec): string {
  if ('containerId' in spec) return `container ${spec.containerId}`;
  if ('pid' in spec) return `pid ${spec.pid}`;
  return `netns ${spec.netns}`;
}
