/**
 * A constant-rate HTTP load generator for `bench -- mirror`, in the manner of wrk2: requests are
 * scheduled at evenly spaced instants and sent over a pool of keep-alive connections, and each
 * one's latency counts from when it was due, not from when a free connection let it out (so a
 * stalled server cannot hide its stall by slowing the client down).
 *
 * Why not autocannon's `-R`: it lets each connection send its whole quota for the second as fast
 * as it can and then idle until the next second, so "5,000 requests/s" arrives as a burst at the
 * target's full speed for a tenth of a second, once a second. That measures how a burst drains,
 * not how mirroring keeps up with a steady rate. autocannon still drives the runs at full speed.
 *
 * The first second is a warm-up at the same rate, sent to WARMUP_PATH and not measured: the
 * connections are made and every process on the way has compiled its hot code before the
 * measured requests start (the stamping server leaves warm-up requests out of its stamps).
 *
 * `node paced-load.js URL RATE CONNECTIONS SECONDS` prints one JSON line:
 * `{ requestsPerSecond, p99Ms, errors }` of the measured requests.
 */
import { Pool } from 'undici';
import { percentile, WARMUP_PATH } from './support.js';

const WARMUP_SECONDS = 1;
/** How often due requests are sent: at 10k requests/s, 10 at a time. */
const TICK_MS = 1;
/** How long requests still in flight at the end may take before they count as errors. */
const DRAIN_MS = 5_000;

export interface PacedLoadResult {
  requestsPerSecond: number;
  p99Ms: number;
  errors: number;
}

export async function pacedLoad(
  url: string,
  rate: number,
  connections: number,
  seconds: number,
): Promise<PacedLoadResult> {
  const target = new URL(url);
  const pool = new Pool(target.origin, { connections, pipelining: 1 });
  const latencies: number[] = [];
  let errors = 0;
  let issued = 0;
  let inFlight = 0;
  const warmup = Math.round(rate * WARMUP_SECONDS);
  const total = warmup + Math.round(rate * seconds);
  const start = performance.now();
  const measuredStart = start + WARMUP_SECONDS * 1000;

  const send = (due: number, measured: boolean): void => {
    inFlight += 1;
    pool
      .request({ path: measured ? target.pathname : WARMUP_PATH, method: 'GET' })
      .then(async ({ statusCode, body }) => {
        await body.dump();
        if (statusCode !== 200) errors += 1;
        else if (measured) latencies.push(performance.now() - due);
      })
      .catch(() => (errors += 1))
      .finally(() => (inFlight -= 1));
  };

  await new Promise<void>((resolve) => {
    const timer = setInterval(() => {
      const elapsed = performance.now() - start;
      const due = Math.min(total, Math.floor((elapsed * rate) / 1000));
      while (issued < due) {
        send(start + (issued * 1000) / rate, issued >= warmup);
        issued += 1;
      }
      if (issued === total) {
        clearInterval(timer);
        resolve();
      }
    }, TICK_MS);
  });
  const drainUntil = performance.now() + DRAIN_MS;
  while (inFlight > 0 && performance.now() < drainUntil) {
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  const elapsedSeconds = (performance.now() - measuredStart) / 1000;
  await pool.destroy();
  errors += inFlight;
  latencies.sort((a, b) => a - b);
  return {
    requestsPerSecond: latencies.length / elapsedSeconds,
    p99Ms: percentile(latencies, 0.99),
    errors,
  };
}

if (process.argv[1] === new URL(import.meta.url).pathname) {
  const [url = '', rate = '', connections = '', seconds = ''] = process.argv.slice(2);
  const result = await pacedLoad(url, Number(rate), Number(connections), Number(seconds));
  console.log(JSON.stringify(result));
}
