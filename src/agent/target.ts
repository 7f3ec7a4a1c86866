import {
  closeSync,
  existsSync,
  fstatSync,
  openSync,
  readdirSync,
  readFileSync,
  statSync,
  type Stats,
} from 'node:fs';
import type { NodeTarget } from '../protocol/agent-launch.js';
import type { TapNetns } from './tap.js';

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
export function tapNetnsOf(spec: NodeTarget): TapNetns {
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
export function describeNodeTarget(spec: NodeTarget): string {
  if ('containerId' in spec) return `container ${spec.containerId}`;
  if ('pid' in spec) return `pid ${spec.pid}`;
  return `netns ${spec.netns}`;
}

/**
 * /proc/PID/stat's fields from the state on (field 3; the command name before it is in
 * parentheses and may hold anything), or undefined when the process is gone.
 */
function statFields(pid: number, procRoot: string): string[] | undefined {
  try {
    const stat = readFileSync(`${procRoot}/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

/** The process's start time (clock ticks since boot): a PID reused by another process differs. */
function startTimeOf(pid: number, procRoot: string): string | undefined {
  const fields = statFields(pid, procRoot);
  // A zombie has exited; only its parent has not reaped it yet.
  if (!fields || fields[0] === 'Z' || fields[0] === 'X') return undefined;
  return fields[19]; // starttime, field 22
}

/** The process's parent (field 4), or undefined when it is gone. */
function parentOf(pid: number, procRoot: string): number | undefined {
  const fields = statFields(pid, procRoot);
  return fields && Number(fields[1]);
}

/** Identity of a namespace (nsfs device and inode), or undefined when it is gone. */
function namespaceOf(path: string): string | undefined {
  try {
    return identity(statSync(path));
  } catch {
    return undefined;
  }
}

function identity(stat: Stats): string {
  return `${stat.dev}:${stat.ino}`;
}

/** Whether the target is still there, asked once a second (see targetPresence). */
export interface TargetPresence {
  /** Why the target is gone, or undefined while it is there. */
  gone(): string | undefined;
  /** Lets go of the target's network namespace. */
  close(): void;
}

/**
 * Whether the target is still there, cheap enough to ask once a second. Polled rather than
 * waited on (a pidfd): a named netns or a pod's namespace has no descriptor to wait on.
 *
 * - A process (`--pid`) is gone when it exited: the session mirrors that process.
 * - A named netns is gone when its name is deleted or names another namespace.
 * - A container is gone when no process but the agent's own is left in its pod's network
 *   namespace: the pod was deleted or its sandbox stopped. A restarted container comes back into
 *   the same namespace, which the tap still sees, so that is not the end of the session.
 *
 * A namespace is known by its inode number, which the kernel gives to the next namespace made
 * once it is freed: a StatefulSet's replacement pod, made a second after, got the deleted pod's
 * number, and its processes were taken for the target's. So the namespace is held open until
 * close(): its number stays its own, and it outlives the pod by at most one poll.
 */
export function targetPresence(
  spec: NodeTarget,
  tapNetns: TapNetns,
  procRoot = '/proc',
): TargetPresence {
  if ('pid' in spec) {
    const started = startTimeOf(spec.pid, procRoot);
    return {
      gone: () =>
        startTimeOf(spec.pid, procRoot) === started ? undefined : `process ${spec.pid} exited`,
      close: () => undefined,
    };
  }
  const [path, why] =
    'netns' in tapNetns
      ? [`/run/netns/${tapNetns.netns}`, `network namespace ${tapNetns.netns} was deleted`]
      : [
          `${procRoot}/${tapNetns.pid}/ns/net`,
          'no process is left in its pod’s network namespace: the pod was deleted or stopped',
        ];
  let held: number | undefined;
  try {
    held = openSync(path, 'r');
  } catch {
    // Gone already: said at the first poll.
    return { gone: () => why, close: () => undefined };
  }
  const namespace = identity(fstatSync(held));
  const close = (): void => {
    if (held !== undefined) closeSync(held);
    held = undefined;
  };
  if ('netns' in tapNetns) {
    return { gone: () => (namespaceOf(path) === namespace ? undefined : why), close };
  }
  let holder = tapNetns.pid;
  const gone = (): string | undefined => {
    if (namespaceOf(`${procRoot}/${holder}/ns/net`) === namespace) return undefined;
    for (const name of readdirSync(procRoot)) {
      if (!/^\d+$/.test(name)) continue;
      const pid = Number(name);
      if (namespaceOf(`${procRoot}/${name}/ns/net`) !== namespace) continue;
      // The agent's own do not hold the pod: its main thread enters the namespace for the app's
      // outgoing connections, and its resolver runs in it.
      if (pid === process.pid || parentOf(pid, procRoot) === process.pid) continue;
      holder = pid;
      return undefined;
    }
    return why;
  };
  return { gone, close };
}
