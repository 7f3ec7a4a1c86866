import {
  execFile,
  execFileSync,
  spawn,
  type ChildProcess,
  type SpawnOptions,
} from 'node:child_process';
import { promisify } from 'node:util';
import { ensureBlackhole } from '../cluster/host.js';
import {
  createNetnsPair,
  deleteNetns,
  listNetns,
  netnsName,
} from '../../src/platform/local/netns.js';

/**
 * Test hosts: a "target" netns (where the service runs and the tap attaches) joined by a veth
 * pair to a "client" netns (where real clients run). Names start with `mirrord-test-` and carry
 * the test process's pid, so a killed run's leftovers are found and removed at the next start;
 * addresses come from 10.213.0.0/16, the range tests may use. Programs are started with
 * node's spawn rather than createHosts' execa: execa's exit hooks, installed anew in every test
 * file's sandboxed `process`, overflow jest's global protection after a few files.
 */
const execFileAsync = promisify(execFile);

export const SANDBOX_PREFIX = 'mirrord-test';

export interface Sandbox {
  /** Name of the target's netns, as `ip netns` knows it. */
  target: string;
  client: string;
  targetAddress: string;
  clientAddress: string;
  /** Starts a program inside one of the sandbox's namespaces; destroy() kills it. */
  spawn(netns: string, command: string, args: string[], options?: SpawnOptions): ChildProcess;
  /** Runs a program inside a namespace to completion and returns its stdout. */
  run(netns: string, command: string, args: string[]): string;
  /**
   * The same without blocking the event loop: for clients whose traffic the test process itself
   * must consume while they run.
   */
  runAsync(netns: string, command: string, args: string[]): Promise<string>;
  destroy(): void;
}

let subnetCount = 0;

export function listTestNetns(): string[] {
  return listNetns(SANDBOX_PREFIX);
}

export function createSandbox(label = 'sandbox'): Sandbox {
  subnetCount += 1;
  // Each sandbox is its own pair of namespaces, so addresses may repeat across sandboxes; the
  // counter only makes logs easier to read.
  const subnet = subnetCount % 250;
  const target = `${netnsName(SANDBOX_PREFIX, label)}-t`;
  const client = target.replace(/-t$/, '-c');
  const targetAddress = `10.213.${subnet}.1`;
  const clientAddress = `10.213.${subnet}.2`;
  const children = new Set<ChildProcess>();
  // Load goes to these addresses: were a namespace not to come up, the host's blackhole for the
  // test range drops it instead of the default route carrying it off the machine.
  ensureBlackhole();
  createNetnsPair({ server: target, client, serverAddress: targetAddress, clientAddress });

  return {
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
    async runAsync(netns, command, args) {
      const { stdout } = await execFileAsync('ip', ['netns', 'exec', netns, command, ...args], {
        encoding: 'utf8',
        maxBuffer: 64 * 1024 * 1024,
      });
      return stdout;
    },
    destroy() {
      for (const child of children) child.kill('SIGKILL');
      deleteNetns(target);
      deleteNetns(client);
    },
  };
}
