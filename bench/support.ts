import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { createHosts, waitForTcp, type Hosts } from '../src/platform/local/netns.js';

/** Requests paced-load.ts sends before it measures; the stamping server does not note them. */
export const WARMUP_PATH = '/warmup';

export function progress(line: string): void {
  process.stderr.write(`${line}\n`);
}

export type BenchHosts = Hosts;

/** A target ("server") netns and a client netns, 10.213.250.0/24; Ctrl-C removes them. */
export function createBenchHosts(): BenchHosts {
  const hosts = createHosts('mirrord-bench', 'hosts', {
    serverAddress: '10.213.250.1',
    clientAddress: '10.213.250.2',
  });
  process.once('SIGINT', () => {
    hosts.destroy();
    process.exit(130);
  });
  return hosts;
}

/** The demo's HTTP service, compiled beside the benchmarks. */
export const HTTP_SERVICE = fileURLToPath(new URL('../src/demo/service.js', import.meta.url));

export async function startHttpTarget(hosts: BenchHosts, port: number): Promise<void> {
  hosts.spawn(hosts.server, process.execPath, [HTTP_SERVICE, hosts.serverAddress, String(port)]);
  await waitForTcp(hosts.client, hosts.serverAddress, port);
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

/** The value at quantile `q` of ascending `sorted` (nearest rank); NaN when it is empty. */
export function percentile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))] ?? NaN;
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

export function round(value: number, digits = 3): number {
  return Number(value.toFixed(digits));
}
