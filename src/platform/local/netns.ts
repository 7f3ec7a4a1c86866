import type { ResultPromise } from 'execa';
import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';
import { execaGuarded } from './guarded.js';

const execFileAsync = promisify(execFile);

/**
 * Named network namespaces (`ip netns`) joined by veth pairs: the sandbox "staging" of the demo
 * and the test hosts. Names carry the pid of the process that made them
 * (`PREFIX-LABEL-PID-N…`), so that leftovers of a killed run can be told from live ones.
 */

function ip(args: string[]): string {
  return execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

export function listNetns(prefix: string): string[] {
  return ip(['netns', 'list'])
    .split('\n')
    .map((line) => line.split(' ')[0] ?? '')
    .filter((name) => name.startsWith(prefix));
}

/** The pid in a name made by `netnsName`, or undefined for a name of another form. */
export function ownerOf(name: string): number | undefined {
  const match = /-(\d+)-\d+(-[a-z]+)?$/.exec(name);
  return match ? Number(match[1]) : undefined;
}

/** Whether a process `pid` exists (the maker a name carries, or any other). */
export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** True for a namespace whose maker is gone (a killed run) or that names no maker. */
export function isStale(name: string): boolean {
  const owner = ownerOf(name);
  return owner === undefined || !isAlive(owner);
}

let madeCount = 0;

/** A fresh name `PREFIX-LABEL-PID-N` for this process. */
export function netnsName(prefix: string, label: string): string {
  madeCount += 1;
  return `${prefix}-${label}-${process.pid}-${madeCount}`;
}

/** Kills every process inside the namespace, then deletes it; a missing one is not an error. */
export function deleteNetns(name: string): void {
  let pids: string[] = [];
  try {
    pids = ip(['netns', 'pids', name]).split('\n').filter(Boolean);
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
  try {
    ip(['netns', 'delete', name]);
  } catch {
    // Already gone.
  }
}

export interface NetnsPair {
  /** The namespace that plays the server (the mirrored target). */
  server: string;
  client: string;
  serverAddress: string;
  clientAddress: string;
}

/**
 * Makes two namespaces joined by a veth pair, `eth0` on both sides, addresses in one /24, lo up.
 * On failure whatever was made is removed before the error is thrown.
 */
export function createNetnsPair(pair: NetnsPair): void {
  try {
    ip(['netns', 'add', pair.server]);
    ip(['netns', 'add', pair.client]);
    // Both ends are created directly inside their namespaces and renamed there, so the
    // temporary names only need to be unique within each namespace.
    ip([
      'link',
      'add',
      'veth-s',
      'netns',
      pair.server,
      'type',
      'veth',
      'peer',
      'veth-c',
      'netns',
      pair.client,
    ]);
    for (const [ns, veth, address] of [
      [pair.server, 'veth-s', pair.serverAddress],
      [pair.client, 'veth-c', pair.clientAddress],
    ] as const) {
      ip(['-n', ns, 'link', 'set', veth, 'name', 'eth0']);
      ip(['-n', ns, 'addr', 'add', `${address}/24`, 'dev', 'eth0']);
      ip(['-n', ns, 'link', 'set', 'lo', 'up']);
      ip(['-n', ns, 'link', 'set', 'eth0', 'up']);
    }
  } catch (error) {
    deleteNetns(pair.server);
    deleteNetns(pair.client);
    throw error;
  }
}

/** Resolves once something inside `netns` accepts TCP connections at address:port. */
export async function waitForTcp(
  netns: string,
  address: string,
  port: number,
  timeoutMs = 10_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const probe = ['netns', 'exec', netns, 'bash', '-c', `exec 3<>/dev/tcp/${address}/${port}`];
  for (;;) {
    try {
      await execFileAsync('ip', probe);
      return;
    } catch {
      if (Date.now() > deadline) {
        throw new Error(`nothing accepts connections at ${address}:${port} in netns ${netns}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

/** A server and a client netns, and the programs started in them (see createHosts). */
export interface Hosts extends NetnsPair {
  /** Starts a program inside one of the two namespaces; destroy() kills it. */
  spawn(netns: string, command: string, args: string[]): ResultPromise;
  destroy(): void;
}

/**
 * A pair of namespaces named `PREFIX-LABEL-PID-N-{s,c}` (removing those of a killed run first)
 * with the programs started in them, all removed by destroy().
 */
export function createHosts(
  prefix: string,
  label: string,
  addresses: { serverAddress: string; clientAddress: string },
): Hosts {
  for (const stale of listNetns(prefix).filter(isStale)) deleteNetns(stale);
  const name = netnsName(prefix, label);
  const pair = { server: `${name}-s`, client: `${name}-c`, ...addresses };
  createNetnsPair(pair);
  const children: ResultPromise[] = [];
  return {
    ...pair,
    spawn(netns, command, args) {
      // Guarded: a killed CLI (the demo's) must not leave them running until the next start.
      const child = execaGuarded('ip', ['netns', 'exec', netns, command, ...args], {
        stdin: 'ignore',
        stdout: 'pipe',
        stderr: 'pipe',
      });
      children.push(child);
      return child;
    },
    destroy() {
      for (const child of children) child.kill('SIGKILL');
      deleteNetns(pair.server);
      deleteNetns(pair.client);
    },
  };
}
