/**
 * `npm run bench -- files`: the target's files read through a session (the agent's `files`
 * feature and the CLI's client, src/features/files/) against reading the same files directly,
 * in one run.
 *
 * The target is a process chrooted in a mount namespace of its own, its files on a tmpfs that
 * only that namespace has, as a pod's volume is; a local agent serves it. Direct reads go
 * through the target's root from this machine (`/proc/PID/root/...`, the same page cache), so
 * the difference is the session's: the agent's openat2 and reads, the framing, the loopback
 * socket and the client.
 *
 * - small files: FILES files of 256 B to 16 KiB, each opened, read whole and closed; latency per
 *   file, p50 and p99 per round.
 * - a large file (LARGE_MIB MiB) read whole: throughput.
 *
 * Both kinds alternate which goes first in each round (MIRRORD_BENCH_ROUNDS, default 7), and
 * every figure is the median over the rounds with its range.
 */
import type { ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { RemoteFiles } from '../src/features/files/cli.js';
import { placeLocalAgent } from '../src/platform/local/agent-process.js';
import { AgentClient } from '../src/protocol/client.js';
import { startChrootedTarget } from '../test/support/chrooted-target.js';
import { median, percentile, progress, round } from './support.js';

const ROUNDS = Number(process.env.MIRRORD_BENCH_ROUNDS ?? 7);
const FILES = 500;
const LARGE_MIB = 256;

type Read = (path: string) => Promise<Buffer>;

function spread(
  values: number[],
  digits = 3,
): { median: number; min: number; max: number; runs: number } {
  return {
    median: round(median(values), digits),
    min: round(Math.min(...values), digits),
    max: round(Math.max(...values), digits),
    runs: values.length,
  };
}

/** Per-file latencies (ms) of reading every small file once. */
async function smallRound(read: Read): Promise<{ p50: number; p99: number }> {
  const ms: number[] = [];
  for (let i = 0; i < FILES; i++) {
    const start = process.hrtime.bigint();
    await read(`/data/small/${i}`);
    ms.push(Number(process.hrtime.bigint() - start) / 1e6);
  }
  ms.sort((a, b) => a - b);
  return { p50: percentile(ms, 0.5), p99: percentile(ms, 0.99) };
}

/** MB/s of reading the large file whole. */
async function largeRound(read: Read): Promise<number> {
  const start = process.hrtime.bigint();
  const bytes = await read('/data/large');
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  if (bytes.length !== LARGE_MIB * 1024 * 1024)
    throw new Error(`read ${bytes.length} bytes of /data/large`);
  return bytes.length / 1e6 / seconds;
}

export async function benchFiles(): Promise<Record<string, unknown>> {
  const machine = `${cpus().length}-vCPU ${cpus()[0]?.model.trim() ?? 'unknown CPU'}`;
  progress(
    `files: ${machine}; ${ROUNDS} rounds of ${FILES} small files and one ${LARGE_MIB} MiB file`,
  );
  const dir = mkdtempSync(join(tmpdir(), 'mirrord-bench-files-'));
  const root = join(dir, 'root');
  let target: ChildProcess | undefined;
  let client: AgentClient | undefined;
  let stopAgent: (() => Promise<void>) | undefined;
  try {
    // The files are made inside the target's namespace, on its own tmpfs.
    target = await startChrootedTarget(root, [
      `mkdir ${root}/data`,
      `mount -t tmpfs data ${root}/data`,
      `mkdir ${root}/data/small`,
      `for i in $(seq 0 ${FILES - 1}); do head -c $((256 + (i * 7919) % 16128)) /dev/urandom > ${root}/data/small/$i; done`,
      `head -c ${LARGE_MIB * 1024 * 1024} /dev/urandom > ${root}/data/large`,
    ]);
    const pid = target.pid!;
    const agent = await placeLocalAgent({ pid })(() => undefined);
    stopAgent = () => agent.stop();
    client = await AgentClient.start(await agent.connect(), { secret: agent.secret });
    const files = new RemoteFiles(client);
    const direct: Read = (path) => readFile(`/proc/${pid}/root${path}`);
    const session: Read = async (path) => {
      const read = await files.readFile(path);
      if (read.errno !== null) throw new Error(`${path}: ${read.errno}`);
      return read.bytes;
    };
    // Warm-up: the JIT and the page cache, once for each path.
    await smallRound(direct);
    await smallRound(session);

    const small = {
      direct: { p50: [] as number[], p99: [] as number[] },
      session: { p50: [] as number[], p99: [] as number[] },
    };
    const large = { direct: [] as number[], session: [] as number[] };
    const ratios = { smallP99: [] as number[], large: [] as number[] };
    for (let r = 0; r < ROUNDS; r++) {
      const order =
        r % 2 === 0 ? (['direct', 'session'] as const) : (['session', 'direct'] as const);
      const got: Record<string, { p50: number; p99: number; mbps: number }> = {};
      for (const kind of order) {
        const read = kind === 'direct' ? direct : session;
        const latency = await smallRound(read);
        got[kind] = { ...latency, mbps: await largeRound(read) };
        small[kind].p50.push(latency.p50);
        small[kind].p99.push(latency.p99);
        large[kind].push(got[kind].mbps);
      }
      ratios.smallP99.push(got.session!.p99 / got.direct!.p99);
      ratios.large.push(got.session!.mbps / got.direct!.mbps);
      progress(
        `  round ${r + 1}/${ROUNDS}: small p50/p99 direct ${got.direct!.p50.toFixed(3)}/${got.direct!.p99.toFixed(3)} ms, session ${got.session!.p50.toFixed(3)}/${got.session!.p99.toFixed(3)} ms; large direct ${got.direct!.mbps.toFixed(0)} MB/s, session ${got.session!.mbps.toFixed(0)} MB/s`,
      );
    }
    return {
      machine,
      small_file_ms: {
        direct: { p50: spread(small.direct.p50), p99: spread(small.direct.p99) },
        session: { p50: spread(small.session.p50), p99: spread(small.session.p99) },
      },
      small_file_p99_session_over_direct: spread(ratios.smallP99, 2),
      large_file_mb_per_s: { direct: spread(large.direct, 0), session: spread(large.session, 0) },
      large_file_session_over_direct: spread(ratios.large, 2),
    };
  } finally {
    await client?.close();
    await stopAgent?.();
    if (target) {
      const exited = once(target, 'exit');
      if (target.kill('SIGKILL')) await exited;
    }
    rmSync(dir, { recursive: true, force: true });
  }
}
