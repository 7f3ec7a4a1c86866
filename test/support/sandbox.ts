import { execFileSync, spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';

/**
 * Test hosts: a "target" netns (where the service runs and the tap attaches) joined by a veth
 * pair to a "client" netns (where real clients run). Every netns a test makes is named
 * `mirrord-test-…` so that a killed run's leftovers can be found and removed at the next start;
 * addresses come from 10.213.0.0/16, the range the tests are allowed to use.
 */
export const SANDBOX_PREFIX = 'mirrord-test-';

export interface Sandbox {
  /** Name of the target's netns, as `ip netns` knows it. */
  target: string;
  /** Name of the client's netns. */
  client: string;
  targetAddress: string;
  clientAddress: string;
  /** Starts a program inside one of the sandbox's namespaces; it is killed by destroy(). */
  spawn(netns: string, command: string, args: string[], options?: SpawnOptions): ChildProcess;
  /** Runs a program inside a namespace to completion and returns its stdout. */
  run(netns: string, command: string, args: string[]): string;
  destroy(): void;
}

let sandboxCount = 0;

function ip(args: string[]): string {
  return execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function killNetnsProcesses(netns: string): void {
  let pids: string[];
  try {
    pids = ip(['netns', 'pids', netns]).split('\n').filter(Boolean);
  } catch {
    return;
  }
  for (const pid of pids) {
    try {
      process.kill(Number(pid), 'SIGKILL');
    } catch {
      // Already gone.
    }
  }
}

function deleteNetns(netns: string): void {
  killNetnsProcesses(netns);
  try {
    ip(['netns', 'delete', netns]);
  } catch {
    // Already gone.
  }
}

/**
 * The pid of the test process that made a test netns or cgroup: names are
 * `mirrord-test-LABEL-PID-N…`. Undefined for names of another form.
 */
export function ownerOf(name: string): number | undefined {
  const match = /^mirrord-test-[a-z]+-(\d+)-\d+/.exec(name);
  return match ? Number(match[1]) : undefined;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** True for test resources whose maker is gone (a killed run) or that name no maker. */
export function isStale(name: string): boolean {
  const owner = ownerOf(name);
  return owner === undefined || !isAlive(owner);
}

export function listTestNetns(): string[] {
  return ip(['netns', 'list'])
    .split('\n')
    .map((line) => line.split(' ')[0] ?? '')
    .filter((name) => name.startsWith(SANDBOX_PREFIX));
}

/** Removes the given test namespaces and every process inside them. */
export function removeNetns(names: string[]): void {
  for (const name of names) deleteNetns(name);
}

/**
 * Creates a target and a client netns joined by a veth pair. The subnet index keeps the
 * sandboxes of one process apart; the pid keeps parallel runs apart.
 */
export function createSandbox(label = 'sandbox'): Sandbox {
  sandboxCount += 1;
  const subnet = ((process.pid % 200) + sandboxCount) % 250;
  const id = `${label}-${process.pid}-${sandboxCount}`;
  const target = `${SANDBOX_PREFIX}${id}-t`;
  const client = `${SANDBOX_PREFIX}${id}-c`;
  const targetAddress = `10.213.${subnet}.1`;
  const clientAddress = `10.213.${subnet}.2`;
  const children = new Set<ChildProcess>();

  const sandbox: Sandbox = {
    target,
    client,
    targetAddress,
    clientAddress,
    spawn(netns, command, args, options = {}) {
      const child = spawn('ip', ['netns', 'exec', netns, command, ...args], {
        stdio: ['ignore', 'pipe', 'pipe'],
        ...options,
      });
      children.add(child);
      child.once('exit', () => children.delete(child));
      return child;
    },
    run(netns, command, args) {
      return execFileSync('ip', ['netns', 'exec', netns, command, ...args], {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'pipe'],
        maxBuffer: 64 * 1024 * 1024,
      });
    },
    destroy() {
      for (const child of children) child.kill('SIGKILL');
      deleteNetns(target);
      deleteNetns(client);
    },
  };

  try {
    ip(['netns', 'add', target]);
    ip(['netns', 'add', client]);
    // Short names: interface names are limited to 15 bytes.
    const vethTarget = `mt${sandboxCount}p${process.pid}`.slice(0, 15);
    const vethClient = `mc${sandboxCount}p${process.pid}`.slice(0, 15);
    ip([
      'link',
      'add',
      vethTarget,
      'netns',
      target,
      'type',
      'veth',
      'peer',
      vethClient,
      'netns',
      client,
    ]);
    ip(['-n', target, 'link', 'set', vethTarget, 'name', 'eth0']);
    ip(['-n', client, 'link', 'set', vethClient, 'name', 'eth0']);
    ip(['-n', target, 'addr', 'add', `${targetAddress}/24`, 'dev', 'eth0']);
    ip(['-n', client, 'addr', 'add', `${clientAddress}/24`, 'dev', 'eth0']);
    for (const ns of [target, client]) {
      ip(['-n', ns, 'link', 'set', 'lo', 'up']);
      ip(['-n', ns, 'link', 'set', 'eth0', 'up']);
    }
  } catch (error) {
    sandbox.destroy();
    throw error;
  }
  return sandbox;
}

/** Resolves once something accepts TCP connections at host:port inside `netns`. */
export async function waitForPort(
  sandbox: Sandbox,
  netns: string,
  host: string,
  port: number,
  timeoutMs = 10_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      sandbox.run(netns, 'bash', ['-c', `exec 3<>/dev/tcp/${host}/${port}`]);
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`nothing listens on ${host}:${port} in ${netns}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}
