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
 * Read four ways (see Config): by this process directly and through a session's client (the
 * agent's and the CLI's share), and by an app directly and mirrored (what a user's app sees).
 *
 * Both kinds alternate which goes first in each round (MIRRORD_BENCH_ROUNDS, default 7), and
 * every figure is the median over the rounds with its range.
 */
import { execFile, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { RemoteFiles } from '../src/features/files/cli.js';
import { placeLocalAgent } from '../src/platform/local/agent-process.js';
import { AgentClient } from '../src/protocol/client.js';
import { startChrootedTarget } from '../test/support/chrooted-target.js';
import { machineName, median, percentile, progress, round } from './support.js';

const execFileAsync = promisify(execFile);
const ROUNDS = Number(process.env.MIRRORD_BENCH_ROUNDS ?? 7);
const FILES = 500;
const LARGE_MIB = 256;

type Read = (path: string) => Promise<Buffer>;
/**
 * direct and client: this process reads, from the target's root or through a session's client;
 * app_direct and app_mirrored: an app (file-reader.mjs) reads, from the target's root or
 * mirrored from the target (its own calls through the layer, the CLI and the agent).
 */
type Config = 'direct' | 'client' | 'app_direct' | 'app_mirrored';
interface Figures {
  p50: number;
  p99: number;
  mbps: number;
}

const READER = fileURLToPath(new URL('../../bench/file-reader.mjs', import.meta.url));
const CLI = fileURLToPath(new URL('../../bin/run.js', import.meta.url));

/** Runs the reader app and takes its figures (its last line). */
async function appReads(command: string[]): Promise<Figures> {
  const [file, ...args] = command;
  const { stdout } = await execFileAsync(file!, args, { maxBuffer: 1024 * 1024 });
  return JSON.parse(stdout.trim().split('\n').at(-1)!) as Figures;
}

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
  const machine = machineName();
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
    const configs: Record<Config, () => Promise<Figures>> = {
      direct: async () => ({ ...(await smallRound(direct)), mbps: await largeRound(direct) }),
      client: async () => ({ ...(await smallRound(session)), mbps: await largeRound(session) }),
      app_direct: () => appReads([process.execPath, READER, `/proc/${pid}/root`, String(FILES)]),
      app_mirrored: () =>
        appReads([
          process.execPath,
          CLI,
          'mirror',
          '--pid',
          String(pid),
          '--',
          process.execPath,
          READER,
          '',
          String(FILES),
        ]),
    };
    const names = Object.keys(configs) as Config[];
    const figures = Object.fromEntries(names.map((name) => [name, [] as Figures[]])) as Record<
      Config,
      Figures[]
    >;
    for (let r = 0; r < ROUNDS; r++) {
      // A rotating order: drift on a noisy machine hits every configuration alike.
      for (let k = 0; k < names.length; k++) {
        const name = names[(r + k) % names.length]!;
        figures[name].push(await configs[name]());
      }
      const line = names
        .map((name) => {
          const f = figures[name].at(-1)!;
          return `${name} ${f.p50.toFixed(3)}/${f.p99.toFixed(3)} ms ${f.mbps.toFixed(0)} MB/s`;
        })
        .join('; ');
      progress(`  round ${r + 1}/${ROUNDS}: small p50/p99, large: ${line}`);
    }
    const ratio = (over: Config, under: Config, key: 'p99' | 'mbps') =>
      spread(
        figures[over].map((f, i) => f[key] / figures[under][i]![key]),
        2,
      );
    return {
      machine,
      small_file_ms: Object.fromEntries(
        names.map((name) => [
          name,
          {
            p50: spread(figures[name].map((f) => f.p50)),
            p99: spread(figures[name].map((f) => f.p99)),
          },
        ]),
      ),
      large_file_mb_per_s: Object.fromEntries(
        names.map((name) => [
          name,
          spread(
            figures[name].map((f) => f.mbps),
            0,
          ),
        ]),
      ),
      small_file_p99_over_direct: {
        client: ratio('client', 'direct', 'p99'),
        app: ratio('app_mirrored', 'app_direct', 'p99'),
      },
      large_file_over_direct: {
        client: ratio('client', 'direct', 'mbps'),
        app: ratio('app_mirrored', 'app_direct', 'mbps'),
      },
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
