import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';
import { deleteNetns, netnsName } from '../../src/platform/local/netns.js';
import { SANDBOX_PREFIX } from '../support/sandbox.js';

const execFileAsync = promisify(execFile);

/**
 * The cluster's pod network, as a CNI plugin with a bridge would make it: every pod gets its
 * own network namespace with lo and an `eth0` veth whose other end is on a bridge; the bridge
 * lives in the "client" netns, where tests run real clients that reach pod IPs
 * (10.213.128.0/17). All namespaces are named by netnsName('mirrord-test', …), so leftovers of
 * a killed run are found by the test hygiene.
 */

const POD_CIDR_BITS = 17;
/** The bridge's address: the pods' default gateway, and the node's IP. */
export const NODE_IP = '10.213.128.1';

export interface PodSandbox {
  netns: string;
  ip: string;
}

async function ip(args: string[]): Promise<void> {
  await execFileAsync('ip', args);
}

export class PodNetwork {
  readonly clientNetns: string;
  readonly #sandboxes = new Set<string>();
  #hosts = 1;

  private constructor(clientNetns: string) {
    this.clientNetns = clientNetns;
  }

  /** Makes the client netns with the bridge; on failure nothing is left behind. */
  static create(): PodNetwork {
    const network = new PodNetwork(netnsName(SANDBOX_PREFIX, 'kclient'));
    const client = network.clientNetns;
    try {
      execFileSync('ip', ['netns', 'add', client]);
      for (const args of [
        ['link', 'set', 'lo', 'up'],
        ['link', 'add', 'br0', 'type', 'bridge'],
        ['addr', 'add', `${NODE_IP}/${POD_CIDR_BITS}`, 'dev', 'br0'],
        ['link', 'set', 'br0', 'up'],
      ]) {
        execFileSync('ip', ['-n', client, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
      }
    } catch (error) {
      deleteNetns(client);
      throw error;
    }
    return network;
  }

  #nextAddress(): string {
    this.#hosts += 1;
    if (this.#hosts >= 128 * 256 - 1) throw new Error('stand-in pod network: out of pod IPs');
    return `10.213.${128 + Math.floor(this.#hosts / 256)}.${this.#hosts % 256}`;
  }

  /** A pod's netns, wired to the bridge; removed again if any step fails. */
  async createSandbox(): Promise<PodSandbox> {
    const netns = netnsName(SANDBOX_PREFIX, 'kpod');
    const address = this.#nextAddress();
    const hostSide = `vp${this.#hosts}`;
    this.#sandboxes.add(netns);
    try {
      await ip(['netns', 'add', netns]);
      await ip(['-n', netns, 'link', 'set', 'lo', 'up']);
      // Both ends are created directly in their namespaces: `eth0` only has to be unique in the
      // pod's, the host side only in the client netns.
      await ip([
        'link',
        'add',
        'eth0',
        'netns',
        netns,
        'type',
        'veth',
        'peer',
        'name',
        hostSide,
        'netns',
        this.clientNetns,
      ]);
      await ip(['-n', this.clientNetns, 'link', 'set', hostSide, 'master', 'br0', 'up']);
      await ip(['-n', netns, 'addr', 'add', `${address}/${POD_CIDR_BITS}`, 'dev', 'eth0']);
      await ip(['-n', netns, 'link', 'set', 'eth0', 'up']);
      await ip(['-n', netns, 'route', 'add', 'default', 'via', NODE_IP]);
    } catch (error) {
      this.removeSandbox(netns);
      throw error;
    }
    return { netns, ip: address };
  }

  /** Kills whatever still runs in the pod's netns and deletes it (its veth goes with it). */
  removeSandbox(netns: string): void {
    deleteNetns(netns);
    this.#sandboxes.delete(netns);
  }

  close(): void {
    for (const netns of [...this.#sandboxes]) this.removeSandbox(netns);
    deleteNetns(this.clientNetns);
  }
}
