import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NODE_IP, TEST_RANGE } from './layout.js';

/**
 * The host side of the test cluster: the node's address, the safety route and the kernel
 * settings it needs (stop.sh takes the address away again).
 */

function run(command: string, args: string[]): string {
  return execFileSync(command, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function tryRun(command: string, args: string[]): void {
  try {
    run(command, args);
  } catch {
    // Already gone.
  }
}

/**
 * Test traffic must never leave the machine: every address of 10.213.0.0/16 that no more
 * specific route (a pod bridge, a test netns's veth) claims is dropped here instead of going
 * out through the default route.
 */
export function ensureBlackhole(): void {
  if (!run('ip', ['route', 'show', 'type', 'blackhole', TEST_RANGE]).trim()) {
    run('ip', ['route', 'add', 'blackhole', TEST_RANGE]);
  }
}

/**
 * Throws unless `address` stays on this machine: routed to loopback or the pod bridge, or
 * blackholed (the kernel refuses to route it; a Service address is translated before routing).
 */
export function checkRoutedLocally(address: string): void {
  let route: string;
  try {
    route = run('ip', ['route', 'get', address]);
  } catch {
    return; // Blackholed: `ip route get` fails with EINVAL.
  }
  if (/\bvia\b/.test(route) || !/dev (lo|mirrord-)/.test(route)) {
    throw new Error(`${address} would leave this machine (${route.trim()}): not sending to it`);
  }
}

function sysctl(key: string, value: string): void {
  writeFileSync(join('/proc/sys', ...key.split('.')), value);
}

/**
 * The node's address on the loopback interface (kernels without the dummy driver have no other
 * interface that is always up), and the forwarding a Service's DNAT needs.
 */
export function setUpHost(): void {
  ensureBlackhole();
  tryRun('ip', ['address', 'add', `${NODE_IP}/32`, 'dev', 'lo']);
  // A pod's request to a Service is DNATed to another pod on the same bridge: routed by the host.
  sysctl('net.ipv4.ip_forward', '1');
  // Bridged pod-to-pod replies must pass conntrack to be un-DNATed.
  sysctl('net.bridge.bridge-nf-call-iptables', '1');
  // containerd and the kubelet watch many files; the default 128 runs out with a few pods.
  sysctl('fs.inotify.max_user_instances', '8192');
}
