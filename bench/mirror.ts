/**
 * `npm run bench -- mirror`: how much of a loaded target's traffic reaches the local app, how
 * late, and what mirroring costs the target.
 *
 * An HTTP target in a netns gets keep-alive load over 32 connections: paced evenly at 1k, 5k and
 * 10k requests/s (paced-load.ts, which says why not autocannon's `-R`), and from autocannon at
 * the most it can serve; each once without and once with `mirrord mirror` replaying into a local
 * app (the same server program, under the layer). Target and app note when each request arrived,
 * keyed by the client's port and the request's position on its connection (the app sees the
 * original port through the layer), on the one clock of this machine: so fraction and lag are
 * measured outside mirrord, not taken from its own counters (those are printed beside them). The
 * local app's own capacity is measured first, because "every request reaches the app" can only
 * hold at rates the app itself can serve. The CLI's RSS is sampled throughout.
 */
import { execa, type ResultPromise } from 'execa';
import { readFileSync, rmSync, mkdtempSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { waitForTcp } from '../src/platform/local/netns.js';
import { packageRoot } from '../src/package-root.js';
import type { PacedLoadResult } from './paced-load.js';
import {
  createBenchHosts,
  percentile,
  progress,
  round,
  sampleRss,
  type BenchHosts,
} from './support.js';

const PORT = 8080;
const LOCAL_CAPACITY_PORT = 18080;
const SECONDS = 5;
const CONNECTIONS = 32;
const RATES = [1000, 5000, 10_000];
const CATCH_UP_MS = 1500;

const STAMPING_SERVER = fileURLToPath(new URL('./stamping-server.js', import.meta.url));
const PACED_LOAD = fileURLToPath(new URL('./paced-load.js', import.meta.url));
const AUTOCANNON = createRequire(import.meta.url).resolve('autocannon/autocannon.js');
const CLI = join(packageRoot(), 'bin', 'run.js');

interface Load {
  requestsPerSecond: number;
  p99Ms: number;
}

/**
 * Load from `netns` (or this netns) for SECONDS: at `rate`, paced evenly (paced-load.ts);
 * without one, autocannon as fast as the target answers. Achieved rate and p99 latency.
 */
async function load(url: string, rate: number | undefined, netns?: string): Promise<Load> {
  const args = rate
    ? [PACED_LOAD, url, String(rate), String(CONNECTIONS), String(SECONDS)]
    : [AUTOCANNON, '--json', '-c', String(CONNECTIONS), '-d', String(SECONDS), url];
  const result = netns
    ? await execa('ip', ['netns', 'exec', netns, process.execPath, ...args], { reject: false })
    : await execa(process.execPath, args, { reject: false });
  if (rate) {
    const paced = JSON.parse(result.stdout) as PacedLoadResult;
    if (paced.errors > 0) throw new Error(`${paced.errors} requests failed at ${rate}/s`);
    return { requestsPerSecond: paced.requestsPerSecond, p99Ms: paced.p99Ms };
  }
  const report = JSON.parse(result.stdout) as {
    requests: { total: number };
    latency: { p99: number };
    duration: number;
  };
  return {
    requestsPerSecond: report.requests.total / report.duration,
    p99Ms: report.latency.p99,
  };
}

interface Count {
  value: number;
  /** Resolves with the next count printed. */
  next(): Promise<number>;
}

/** Follows the `count N` lines a stamping server prints. */
function counted(child: ResultPromise): Count {
  let waiting: ((value: number) => void)[] = [];
  const count: Count = {
    value: 0,
    next: () => new Promise((resolve) => waiting.push(resolve)),
  };
  child.stdout?.on('data', (chunk: Buffer) => {
    for (const match of chunk.toString().matchAll(/count (\d+)/g)) count.value = Number(match[1]);
    const resolvers = waiting;
    waiting = [];
    for (const resolve of resolvers) resolve(count.value);
  });
  return count;
}

function readStamps(file: string): Map<string, number> {
  const stamps = new Map<string, number>();
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    const [key, micros] = line.split(' ');
    if (key && micros) stamps.set(key, Number(micros));
  }
  return stamps;
}

interface Target {
  child: ResultPromise;
  count: Count;
  stop(): Promise<void>;
}

async function startTarget(hosts: BenchHosts, stampsFile: string): Promise<Target> {
  const child = hosts.spawn(hosts.server, process.execPath, [
    STAMPING_SERVER,
    hosts.serverAddress,
    String(PORT),
    stampsFile,
  ]);
  const count = counted(child);
  await waitForTcp(hosts.client, hosts.serverAddress, PORT);
  return {
    child,
    count,
    async stop() {
      child.kill('SIGTERM');
      await child;
    },
  };
}

interface Mirrored extends Load {
  fractionReachingApp: number;
  lagP50Ms: number;
  lagP99Ms: number;
  cliLagP99Ms: number | null;
  cliRssMiB: number;
}

/** One load run with the app under `mirrord mirror`. */
async function runMirrored(
  hosts: BenchHosts,
  dir: string,
  rate: number | undefined,
): Promise<Mirrored> {
  const targetStamps = join(dir, 'target');
  const appStamps = join(dir, 'app');
  const target = await startTarget(hosts, targetStamps);
  const mirror = execa(
    process.execPath,
    [
      CLI,
      'mirror',
      '--netns',
      hosts.server,
      '--json',
      '--',
      process.execPath,
      STAMPING_SERVER,
      '0.0.0.0',
      String(PORT),
      appStamps,
    ],
    { reject: false, all: true },
  );
  const app = counted(mirror);
  const events: { event: string; lagP99Ms?: number | null }[] = [];
  mirror.stdout?.on('data', (chunk: Buffer) => {
    for (const line of chunk.toString().split('\n')) {
      if (line.startsWith('{"event"')) events.push(JSON.parse(line) as (typeof events)[number]);
    }
  });
  const rss = sampleRss(mirror.pid!);
  try {
    while (!events.some((e) => e.event === 'listen')) {
      if (mirror.exitCode !== null) throw new Error(`mirror exited: ${String(mirror.all)}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const result = await load(`http://${hosts.serverAddress}:${PORT}/`, rate, hosts.client);
    // Until the app has every request the target got, or nothing more came for a while; the
    // target's count is taken from a line printed after the load ended.
    await target.count.next();
    let last = -1;
    let still = Date.now();
    while (app.value < target.count.value && Date.now() - still < CATCH_UP_MS) {
      if (app.value !== last) [last, still] = [app.value, Date.now()];
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    mirror.kill('SIGINT');
    await mirror;
    await target.stop();
    const atTarget = readStamps(targetStamps);
    const atApp = readStamps(appStamps);
    const lags: number[] = [];
    for (const [key, arrived] of atTarget) {
      const replayed = atApp.get(key);
      if (replayed !== undefined) lags.push((replayed - arrived) / 1000);
    }
    lags.sort((a, b) => a - b);
    const totals = events.findLast((e) => e.event === 'counters');
    return {
      ...result,
      fractionReachingApp: lags.length / atTarget.size,
      lagP50Ms: percentile(lags, 0.5),
      lagP99Ms: percentile(lags, 0.99),
      cliLagP99Ms: totals?.lagP99Ms ?? null,
      cliRssMiB: rss.stop(),
    };
  } finally {
    rss.stop();
    mirror.kill('SIGKILL');
    target.child.kill('SIGKILL');
  }
}

async function runPlain(hosts: BenchHosts, rate: number | undefined): Promise<Load> {
  const target = await startTarget(hosts, '/dev/null');
  try {
    return await load(`http://${hosts.serverAddress}:${PORT}/`, rate, hosts.client);
  } finally {
    await target.stop();
  }
}

/** What the local app serves at most, on loopback, with nobody else running. */
async function localAppCapacity(): Promise<number> {
  const app = execa(
    process.execPath,
    [STAMPING_SERVER, '127.0.0.1', String(LOCAL_CAPACITY_PORT), '/dev/null'],
    { reject: false },
  );
  try {
    await new Promise((resolve) => setTimeout(resolve, 300));
    return (await load(`http://127.0.0.1:${LOCAL_CAPACITY_PORT}/`, undefined)).requestsPerSecond;
  } finally {
    app.kill('SIGTERM');
    await app;
  }
}

export async function benchMirror(): Promise<Record<string, unknown>> {
  const hosts = createBenchHosts();
  const dir = mkdtempSync(join(tmpdir(), 'mirrord-bench-mirror-'));
  try {
    const appCapacity = await localAppCapacity();
    progress(`local app alone: ${appCapacity.toFixed(0)} requests/s`);
    const figures: Record<string, unknown> = { local_app_max_rps: round(appCapacity, 0) };
    let cliRssMiB = 0;
    for (const rate of [...RATES, undefined]) {
      const label = rate ? `at_${rate}_rps` : 'at_target_max';
      const plain = await runPlain(hosts, rate);
      const mirrored = await runMirrored(hosts, dir, rate);
      cliRssMiB = Math.max(cliRssMiB, mirrored.cliRssMiB);
      figures[label] = {
        fraction_reaching_app: round(mirrored.fractionReachingApp, 4),
        lag_p50_ms: round(mirrored.lagP50Ms, 2),
        lag_p99_ms: round(mirrored.lagP99Ms, 2),
        cli_reported_lag_p99_ms:
          mirrored.cliLagP99Ms === null ? null : round(mirrored.cliLagP99Ms, 2),
        target_rps_without_mirror: round(plain.requestsPerSecond, 0),
        target_rps_with_mirror: round(mirrored.requestsPerSecond, 0),
        target_p99_ms_without_mirror: round(plain.p99Ms, 2),
        target_p99_ms_with_mirror: round(mirrored.p99Ms, 2),
      };
      progress(`${label}: ${JSON.stringify(figures[label])}`);
    }
    figures.cli_rss_max_mib = round(cliRssMiB, 1);
    return figures;
  } finally {
    hosts.destroy();
    rmSync(dir, { recursive: true, force: true });
  }
}
