/**
 * HTTP load for `bench -- mirror`, from vegeta (built by `scripts/setup.sh --bench`): a Go load
 * generator, so that on the one CPU the benchmarks give the users it can offer 10k requests/s
 * and more without becoming what is measured (a generator on Node's undici, tried first, reached
 * 10k requests/s only with its own queueing as the latency, and autocannon did not pace).
 *
 * At a rate, vegeta sends requests at evenly spaced instants over at most CONNECTIONS keep-alive
 * connections; each request's latency here counts from when it was due (its sequence number
 * over the rate), not from when a free connection let it out, so a stalled server cannot hide
 * its stall by slowing the generator down (wrk2's correction). Without a rate, vegeta sends as
 * fast as the target answers on those connections. The first second is a warm-up at the same
 * rate to WARMUP_PATH, not measured (the stamping server does not note it either): connections
 * are made and every process on the way has compiled its hot code before measured requests.
 */
import { execa } from 'execa';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { percentile, WARMUP_PATH } from './support.js';

const VEGETA = join(
  process.env.MIRRORD_DEV_CACHE ??
    join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'mirrord-dev'),
  'vegeta-v12.13.0',
  'vegeta',
);
const WARMUP_SECONDS = 1;

export interface Load {
  /** Requests answered in the measured attack (the warm-up's not included). */
  requests: number;
  requestsPerSecond: number;
  p50Ms: number;
  p99Ms: number;
  p999Ms: number;
}

/** Nanoseconds since the epoch of an RFC 3339 time with nanoseconds, as vegeta writes them. */
function epochNanos(time: string): number {
  const match = /^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/.exec(time);
  if (!match) throw new Error(`vegeta wrote a time it should not: ${time}`);
  const fraction = (match[2] ?? '').padEnd(9, '0').slice(0, 9);
  return Date.parse(`${match[1]}${match[3]}`) * 1e6 + Number(fraction);
}

/** One vegeta attack from `netns` (or this one); its results, in the order they were due. */
async function attack(
  netns: string | undefined,
  url: string,
  rate: number | undefined,
  seconds: number,
  connections: number,
): Promise<{ seq: number; code: number; start: number; latency: number }[]> {
  const dir = mkdtempSync(join(tmpdir(), 'mirrord-vegeta-'));
  try {
    writeFileSync(join(dir, 'targets'), `GET ${url}\n`);
    const limits = [
      `-connections=${connections}`,
      `-max-connections=${connections}`,
      `-workers=${connections}`,
      `-max-workers=${connections}`,
    ];
    const inNetns = netns ? ['ip', 'netns', 'exec', netns] : [];
    const [command, ...args] = [
      ...inNetns,
      VEGETA,
      'attack',
      `-targets=${join(dir, 'targets')}`,
      `-rate=${rate ?? 0}`,
      `-duration=${seconds}s`,
      '-keepalive=true',
      ...limits,
      `-output=${join(dir, 'results')}`,
    ];
    await execa(command!, args);
    const { stdout } = await execa(VEGETA, ['encode', '--to', 'json', join(dir, 'results')], {
      maxBuffer: 1 << 30,
    });
    return stdout
      .split('\n')
      .filter(Boolean)
      .map((line) => {
        const result = JSON.parse(line) as {
          seq: number;
          code: number;
          timestamp: string;
          latency: number;
        };
        return {
          seq: result.seq,
          code: result.code,
          start: epochNanos(result.timestamp),
          latency: result.latency,
        };
      })
      .sort((a, b) => a.seq - b.seq);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Load on `origin` from `netns` (or this one) for `seconds` after the warm-up: at `rate`
 * requests/s, or as fast as the target answers. `afterWarmUp` runs between the two, to open a
 * measuring window that covers what the latencies cover. Throws when a request failed.
 */
export async function vegetaLoad(
  netns: string | undefined,
  origin: string,
  rate: number | undefined,
  seconds: number,
  connections: number,
  afterWarmUp?: () => Promise<void>,
): Promise<Load> {
  await attack(netns, `${origin}${WARMUP_PATH}`, rate, WARMUP_SECONDS, connections);
  await afterWarmUp?.();
  const results = await attack(netns, `${origin}/`, rate, seconds, connections);
  const failed = results.filter((r) => r.code !== 200).length;
  if (failed > 0 || results.length === 0) {
    throw new Error(`${failed} of ${results.length} requests failed at ${rate ?? 'full'} rate`);
  }
  const first = results.reduce((earliest, r) => Math.min(earliest, r.start), Infinity);
  // Due: the schedule's start plus the sequence over the rate, the start being the latest one
  // that no request was sent before (vegeta sends late, never early); at full speed, when sent.
  const scheduleStart = rate
    ? results.reduce((o, r) => Math.min(o, r.start - (r.seq * 1e9) / rate), Infinity)
    : 0;
  const latencies = results
    .map(
      (r) =>
        (rate ? r.start + r.latency - (scheduleStart + (r.seq * 1e9) / rate) : r.latency) / 1e6,
    )
    .sort((a, b) => a - b);
  const end = results.reduce((latest, r) => Math.max(latest, r.start + r.latency), first);
  return {
    requests: results.length,
    requestsPerSecond: results.length / ((end - first) / 1e9),
    p50Ms: percentile(latencies, 0.5),
    p99Ms: percentile(latencies, 0.99),
    p999Ms: percentile(latencies, 0.999),
  };
}
