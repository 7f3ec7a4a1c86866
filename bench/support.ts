import { execa, type ResultPromise } from 'execa';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  createNetnsPair,
  deleteNetns,
  isStale,
  listNetns,
  netnsName,
  waitForTcp,
} from '../src/platform/local/netns.js';

const BENCH_PREFIX = 'mirrord-bench';

export function progress(line: string): void {
  process.stderr.write(`${line}\n`);
}

/** A target netns and a client netns (10.213.250.0/24), and the programs started in them. */
export interface BenchHosts {
  target: string;
  client: string;
  targetAddress: string;
  spawn(netns: string, command: string, args: string[]): ResultPromise;
  destroy(): void;
}

export function createBenchHosts(): BenchHosts {
  for (const stale of listNetns(BENCH_PREFIX).filter(isStale)) deleteNetns(stale);
  const target = `${netnsName(BENCH_PREFIX, 'hosts')}-t`;
  const client = target.replace(/-t$/, '-c');
  const targetAddress = '10.213.250.1';
  createNetnsPair({
    server: target,
    client,
    serverAddress: targetAddress,
    clientAddress: '10.213.250.2',
  });
  const children: ResultPromise[] = [];
  const hosts: BenchHosts = {
    target,
    client,
    targetAddress,
    spawn(netns, command, args) {
      const child = execa('ip', ['netns', 'exec', netns, command, ...args], {
        reject: false,
        stdin: 'ignore',
      });
      children.push(child);
      return child;
    },
    destroy() {
      for (const child of children) child.kill('SIGKILL');
      deleteNetns(target);
      deleteNetns(client);
    },
  };
  process.once('SIGINT', () => {
    hosts.destroy();
    process.exit(130);
  });
  return hosts;
}

/** The demo's HTTP service, compiled beside the benchmarks. */
export const HTTP_SERVICE = fileURLToPath(new URL('../src/demo/service.js', import.meta.url));

export async function startHttpTarget(hosts: BenchHosts, port: number): Promise<void> {
  hosts.spawn(hosts.target, process.execPath, [HTTP_SERVICE, hosts.targetAddress, String(port)]);
  await waitForTcp(hosts.client, hosts.targetAddress, port);
}

/** Requests per second wrk reached against `url` from the client netns. */
export async function wrkRequestsPerSecond(
  hosts: BenchHosts,
  url: string,
  seconds: number,
  connections: number,
): Promise<number> {
  const result = await hosts.spawn(hosts.client, 'wrk', [
    '-t1',
    `-c${connections}`,
    `-d${seconds}s`,
    url,
  ]);
  const match = /Requests\/sec:\s+([\d.]+)/.exec(String(result.stdout));
  if (!match) throw new Error(`wrk printed no rate: ${String(result.stderr || result.stdout)}`);
  return Number(match[1]);
}

/** Highest resident set size of a process, sampled until stop() is called. */
export function sampleRss(pid: number, intervalMs = 250): { stop(): number } {
  let maxKiB = 0;
  const sample = (): void => {
    try {
      const match = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
      if (match) maxKiB = Math.max(maxKiB, Number(match[1]));
    } catch {
      // The process is gone.
    }
  };
  sample();
  const timer = setInterval(sample, intervalMs);
  return {
    stop() {
      clearInterval(timer);
      sample();
      return maxKiB / 1024;
    },
  };
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

export function round(value: number, digits = 3): number {
  return Number(value.toFixed(digits));
}
